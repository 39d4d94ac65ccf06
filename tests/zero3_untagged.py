"""The trainer with ``ShardedMoE``'s ZeRO-3 placement tags left off: the negative control of tests/test_zero3.py.

Its experts are then partitioned over all ranks like dense weights (mixing the experts of different
expert-parallel ranks) and their gradients averaged over the wrong group: the run must differ from ZeRO-2.
Launched as a module (``--module tests.zero3_untagged``) by DeepSpeed's runner.
"""
from recipe.train import exit_program, main  # first: it quiets DeepSpeed's import-time logging
from recipe.model.moe import layer  # noqa: E402


def _untagged_init(self, *args, **kwargs):
    layer.MoEBase.__init__(self, *args, **kwargs)


layer.ShardedMoE.__init__ = _untagged_init
layer.ShardedMoE.set_deepspeed_parallelism = layer.MoEBase.set_deepspeed_parallelism

if __name__ == "__main__":
    exit_program(main(as_program=True))
