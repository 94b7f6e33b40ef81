"""arch stage: everything qconvert knows about model families, in one table.

    table.py    ArchSpec per family; HF architectures / model_type -> spec (resolve)
    hparams.py  the GGUF hyper-parameter KVs each family's converter writes, rope-generated KVs and tensors
    tensors.py  HF -> GGUF tensor names, the converter's transforms, the tensor plan, LM_HEAD
    vocab.py    tokenizer exporters and per-family tokenizer KVs
    blocks.py   decoder-block module names and the AWQ scaling groups built from them
    facts.py    ModelFacts (layer/head/expert counts, the 70B rule) from GGUF KVs, for every input

Nothing outside this package names HF tensors or families. Adding a family: its ArchSpec and map lines in
table.py, a writer in hparams.py (or an existing one), a BlockLayout in blocks.py if its block differs, and
its tests in tests/arch/.
"""
