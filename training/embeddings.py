"""Map the learned word embeddings to 2-D, as the lab suggests, and save a PNG.

    python -m training.embeddings runs/lyrics                      # t-SNE if scikit-learn is there
    python -m training.embeddings runs/lyrics --top 300 --method pca --out words.png

The N most frequent words (special tokens, line breaks and punctuation left out) are projected
with t-SNE (the optional ``tsne`` extra: scikit-learn) or PCA (torch alone) and drawn with
their labels. Words that the network uses alike land close together.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from model_store import checkpoint
from model_store.vocab import NEWLINE, SPECIAL_TOKENS, Vocab
from training.plots import render_png


def frequent_words(vocab: Vocab, top: int) -> list[int]:
    """Ids of the ``top`` most frequent real words (the vocabulary is frequency-sorted)."""
    skip = {*SPECIAL_TOKENS, NEWLINE}
    ids = [
        i for i, tok in enumerate(vocab.tokens) if tok not in skip and any(c.isalnum() for c in tok)
    ]
    return ids[:top]


def project(vectors: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2) with PCA or t-SNE."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(vectors) - 1) // 3)))
        return np.asarray(
            TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
        )
    centered = torch.from_numpy(vectors - vectors.mean(axis=0))
    _, _, v = torch.pca_lowrank(centered, q=2, center=False)
    return (centered @ v[:, :2]).numpy()


def plot_embeddings(run_dir: Path, top: int = 200, method: str = "auto") -> bytes:
    loaded = checkpoint.load(run_dir, "cpu")
    ids = frequent_words(loaded.vocab, top)
    if len(ids) < 3:
        raise ValueError(f"{run_dir}: the vocabulary holds fewer than 3 words to draw")
    if method == "auto":
        method = "tsne" if importlib.util.find_spec("sklearn") else "pca"
    vectors = loaded.model.embedding.weight.detach()[ids].numpy().astype(np.float64)
    points = project(vectors, method)
    fig = Figure(figsize=(12, 12), layout="constrained")
    ax = fig.subplots()
    ax.scatter(points[:, 0], points[:, 1], s=6, color="tab:blue", alpha=0.6)
    for (x, y), i in zip(points, ids, strict=True):
        ax.annotate(loaded.vocab.tokens[i], (x, y), fontsize=7, alpha=0.85)
    ax.set_title(f"{run_dir.name}: {len(ids)} most frequent words ({method.upper()})")
    ax.set_xticks([])
    ax.set_yticks([])
    return render_png(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.embeddings", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", type=Path, help="a run folder written by python -m training")
    parser.add_argument(
        "--top",
        type=int,
        default=200,
        help="how many of the most frequent words to draw (default: 200)",
    )
    parser.add_argument(
        "--method",
        choices=["auto", "tsne", "pca"],
        default="auto",
        help="auto: t-SNE when scikit-learn is installed, else PCA (default: auto)",
    )
    parser.add_argument("--out", type=Path, help="PNG to write (default: RUN_DIR/embeddings.png)")
    args = parser.parse_args(argv)
    if args.top < 3:
        parser.error("--top must be at least 3")
    if args.method == "tsne" and importlib.util.find_spec("sklearn") is None:
        print(
            "error: --method tsne needs scikit-learn: pip install 'wordrnn[tsne]'", file=sys.stderr
        )
        return 2
    out = args.out or args.run_dir / "embeddings.png"
    try:
        png = plot_embeddings(args.run_dir, args.top, args.method)
        checkpoint.atomic_write_bytes(out, png)
    except (checkpoint.CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
