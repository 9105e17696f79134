"""Build a tiny, randomly initialised OFA checkpoint offline (for tests and env smoke checks).

Runs with the OFA venv's python (it needs ModelScope + transformers 4.x):

    .ofa-venv/bin/python scripts/make_tiny_ofa.py OUT_DIR [--seed 0]

Writes what ModelScope's OFA loaders read: config.json + weights (OFAModel.save_pretrained)
and a BART-style byte-level BPE tokenizer (vocab.json + merges.txt) trained on a few
sentences with the ``tokenizers`` library, plus configuration.json like ModelScope's hub
checkpoints. The model's vocab_size covers the BPE vocabulary + OFA's 8192 image-code and
1000 location-bin tokens that the worker adds, as for the real checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "alip", "captioners"))
import ofa_worker  # noqa: E402  (ModelScope import helper shared with the worker)

CORPUS = [
    "a red circle on the left of a blue background",
    "a small green square at the top right",
    "a large yellow triangle in the middle",
    "what does the image describe?",
    "a picture of a cat sitting on a couch",
]


def build_bpe(out_dir: str, vocab_size: int = 400) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    # BART's special tokens and ids: <s>=0, <pad>=1, </s>=2, <unk>=3 (OFAConfig defaults rely on them)
    bpe.train_from_iterator(
        CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(out_dir)  # vocab.json + merges.txt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d-model", type=int, default=32)
    args = ap.parse_args()

    import torch

    OFAModel, OFATokenizer, _ = ofa_worker._import_ofa()
    from modelscope.models.multi_modal.ofa.configuration_ofa import OFAConfig

    os.makedirs(args.out_dir, exist_ok=True)
    build_bpe(args.out_dir)
    tok = OFATokenizer.from_pretrained(args.out_dir)
    vocab = json.load(open(os.path.join(args.out_dir, "vocab.json")))
    assert tok.get_vocab() == vocab, "OFATokenizer did not load the tiny vocabulary"
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)

    d = args.d_model
    config = OFAConfig(
        vocab_size=len(tok) + 8192 + 1000,
        d_model=d,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * d,
        decoder_ffn_dim=2 * d,
        max_position_embeddings=64,
        resnet_type="resnet18",  # OFA's ResNet stem; the smallest it builds
        token_bucket_size=32,
        image_bucket_size=16,
        code_image_size=16,
        dropout=0.0,
    )
    torch.manual_seed(args.seed)
    model = OFAModel(config)
    # Shared embeddings (encoder/decoder/output projection) as in the real checkpoints, which
    # ship as pytorch_model.bin; safetensors refuses the sharing, so save the same format.
    model.save_pretrained(args.out_dir, safe_serialization=False)
    tok.save_pretrained(args.out_dir)
    with open(os.path.join(args.out_dir, "configuration.json"), "w") as f:
        json.dump({"framework": "pytorch", "task": "image-captioning",
                   "model": {"type": "ofa", "patch_image_size": 64, "imagenet_default_mean_and_std": False}}, f)
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny OFA written to {args.out_dir}: {n} parameters, vocab {config.vocab_size}")


if __name__ == "__main__":
    main()
