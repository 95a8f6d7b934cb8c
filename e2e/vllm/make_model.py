"""A small Llama-architecture model made here, with no model hub: a byte-level BPE tokenizer
trained on the Python standard library's sources, a config, and random weights.

    python make_model.py OUT_DIR [--size tiny|bench] [--dummy]

- ``tiny``: 2 layers, hidden 128, 2 KV heads of 32 (CPU attention needs head size >= 32);
  1.3 M parameters, made in seconds. For the end-to-end tests.
- ``bench``: 8 layers, hidden 1024, 8 KV heads of 128; a 4k-token prefill costs about a
  second on one core, so loading KV instead of computing it is measurable. For benchmarks.

Weights are random (seed 0, ``initializer_range`` 0.2) but real, so the output depends on
the KV: a connector that loads wrong bytes changes the tokens and logprobs. ``--dummy``
writes no weights (serve with ``--load-format dummy``).

Idempotent: an existing OUT_DIR with a ``kvtier-model.json`` of the same size is kept.
"""

import argparse
import glob
import json
import os
import sys
import sysconfig

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "bench": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, head_dim=128),
}
VOCAB = 4096
MAX_LEN = 8192
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tokenizer(out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:150]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train(files, trainer)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": MAX_LEN,
            "chat_template": CHAT_TEMPLATE,
        }, f, indent=1)


def config(size):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "max_position_embeddings": MAX_LEN, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "initializer_range": 0.2, **SIZES[size],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--dummy", action="store_true")
    a = p.parse_args()
    stamp = os.path.join(a.out, "kvtier-model.json")
    want = {"size": a.size, "dummy": a.dummy, "config": config(a.size)}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return
    os.makedirs(a.out, exist_ok=True)
    tokenizer(a.out)
    cfg = config(a.size)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if not a.dummy:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
        model.save_pretrained(a.out, safe_serialization=True)
        # save_pretrained rewrites config.json; keep ours (same values, stable bytes).
        with open(os.path.join(a.out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    with open(stamp, "w") as f:
        json.dump(want, f, indent=1)
    print(a.out, file=sys.stderr)


if __name__ == "__main__":
    main()
