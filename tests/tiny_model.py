"""Small randomly initialised causal LMs of real architectures and a character-level
tokenizer that tests create on the fly (no download), in transformers format."""

from __future__ import annotations

from pathlib import Path

CHARS = list("0123456789+-=*/()., ?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\\{}#:")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The architectures make_tiny_model builds (transformers config and model class names).
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
}


def char_tokenizer():
    """A word-level tokenizer over :data:`CHARS` with <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_tiny_model(folder: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64,
                    architecture: str = "llama") -> Path:
    """Writes a small random model of ``architecture`` (a key of :data:`ARCHITECTURES`;
    ``llama-bias`` has biased attention and MLP projections) with head_dim 32 and the
    character tokenizer to ``folder``."""
    import torch
    import transformers

    tokenizer = char_tokenizer()
    config_name, model_name = ARCHITECTURES[architecture]
    vocab = tokenizer.get_vocab()
    options = dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                   num_hidden_layers=layers, num_attention_heads=hidden // 32,
                   num_key_value_heads=hidden // 32, max_position_embeddings=256,
                   bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                   pad_token_id=vocab["<pad>"], tie_word_embeddings=False)
    if architecture == "llama-bias":
        options.update(attention_bias=True, mlp_bias=True)
    if architecture in ("qwen3", "gemma2"):
        options["head_dim"] = 32
    if architecture == "gemma2":   # soft-capped logits: the logits path of the log-prob op
        options.update(sliding_window=16, final_logit_softcapping=30.0)
    config = getattr(transformers, config_name)(**options)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if architecture == "llama-bias":   # biases start at zero: make them count
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(std=0.1)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
