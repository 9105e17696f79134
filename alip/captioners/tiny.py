"""Build small transformers captioners from configs, offline (no hub downloads).

Used by scripts/train_builtin_captioner.py (the shipped built-in captioner) and by the tests
(tiny random BLIP/GIT saved to disk and loaded back through the real ``hf`` path).

Tokenizers are built with the ``tokenizers`` library and wrapped in transformers' Bert
tokenizer via ``tokenizer_object``: in transformers 5 ``BertTokenizer(vocab_file=...)``
silently ignores the file, so never build one that way.
"""

from __future__ import annotations

from collections.abc import Iterable

# [DEC] is BLIP's decoder BOS token (BLIP replaces [CLS] by it before decoding).
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_word_tokenizer(words: Iterable[str]):
    """A lower-casing word-level Bert tokenizer whose vocabulary is exactly SPECIAL_TOKENS + words.

    Punctuation is split off by the Bert pre-tokenizer, so include "," "." etc. in ``words``
    if the texts use them. Unknown words map to [UNK].
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words} - set(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        do_lower_case=True,
        model_max_length=64,
    )
    if tokenizer.get_vocab() != vocab:  # guard against transformers rebuilding its own vocab
        raise RuntimeError("tokenizer vocabulary differs from the one requested")
    return tokenizer


def sincos_2d(grid: int, dim: int):
    """Fixed 2-D sine-cosine position embeddings, [grid*grid, dim] row-major (MAE's recipe)."""
    import torch

    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need dim % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    out_x = xs.reshape(-1, 1) * omega
    out_y = ys.reshape(-1, 1) * omega
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)


def tiny_blip(
    tokenizer,
    image_size: int = 64,
    patch_size: int = 8,
    vision_hidden: int = 128,
    vision_layers: int = 2,
    text_hidden: int = 128,
    text_layers: int = 2,
    heads: int = 4,
    max_positions: int = 40,
    seed: int = 0,
    sincos_positions: bool = False,
):
    """A randomly initialised BlipForConditionalGeneration + BlipProcessor for ``tokenizer``."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = tokenizer.get_vocab()
    config = BlipConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 4,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=vision_hidden,
            initializer_range=0.02,  # BLIP's default (1e-10) assumes pretrained weights get loaded
        ),
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=text_hidden,
            encoder_hidden_size=vision_hidden,
            intermediate_size=text_hidden * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_positions,
            projection_dim=text_hidden,
            bos_token_id=vocab["[DEC]"],
            eos_token_id=vocab["[SEP]"],
            sep_token_id=vocab["[SEP]"],
            pad_token_id=vocab["[PAD]"],
        ),
        projection_dim=text_hidden,
        image_text_hidden_size=text_hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    if sincos_positions:
        # Trained from scratch on little data, a ViT whose position embeddings start at
        # std 0.02 first learns position-free statistics (colour, size) and is slow to find
        # where things are; starting from 2-D sin-cos positions (as MAE does) fixes that.
        emb = model.vision_model.embeddings.position_embedding
        grid = image_size // patch_size
        with torch.no_grad():
            emb.zero_()
            emb[0, 1:] = sincos_2d(grid, emb.shape[-1])
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_git(tokenizer, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A randomly initialised GitForCausalLM + GitProcessor for ``tokenizer``."""
    import torch
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    vocab = tokenizer.get_vocab()
    config = GitConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
        ),
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        bos_token_id=vocab["[CLS]"],
        eos_token_id=vocab["[SEP]"],
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(seed)
    model = GitForCausalLM(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, GitProcessor(image_processor=image_processor, tokenizer=tokenizer)
