import sys
from bench.layer_bench import Case, MemoryMeter
if __name__ == "__main__":
    m = MemoryMeter()
    for c in [Case("grid",256,688,8,1024,1,1.0), Case("grid",256,688,8,4096,2,1.0), Case("grid",256,688,8,4096,2,1.25), Case("grid",256,688,8,16384,2,1.25),
              Case("experts",256,688,64,8192,2,1.25), Case("bf16",256,688,8,1024,2,1.25,"bf16")]:
        o, d = m.measure(c, "ours"), m.measure(c, "deepspeed")
        print(f"{c.label}: ours {o:.0f} MiB  DS {d:.0f} MiB  ours/DS {o/d:.2f}", flush=True)
