"""Data pipeline: corpus -> SentencePiece tokenizer -> token shards -> per-rank batches.

See prepare.py for the on-disk format and loader.py for the sharding contract. Import from the
modules (``recipe.data.loader`` ...): the package imports none of them, so that
`python -m recipe.data.prepare` does not find its module already imported (runpy warns then).
"""
