"""Human-rated sentiment sentences from the ``vaderSentiment`` 3.3.2 source distribution (MIT): 10,604 movie-review
snippets, plus tweets, Amazon product and New York Times editorial snippets, each with the mean of about 20 human
ratings on [-4, 4] (Hutto & Gilbert, ICWSM 2014). They ship inside the sdist's nested archive
``additional_resources/hutto_ICWSM_2014.tar.gz``.

``python -m bitsmith.zoo.sentiment`` (run by ``make data``) fetches the sdist with ``pip download --no-deps
--no-binary :all:`` and unpacks the ground-truth files into bitsmith's data cache.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bitsmith.zoo.prose import text_root

SDIST = "vaderSentiment==3.3.2"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
KINDS = {"movie": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
         "nyt": "nytEditorialSnippets"}  # fmt: skip
MAX_FILE_BYTES = 8 << 20  # the largest ground-truth file is about 1.3 MB


def sentiment_dir(fetch: bool = False) -> Path:
    """The unpacked ground-truth folder (fetched when ``fetch`` and missing)."""
    out = text_root() / "vader-sentiment"
    if out.is_dir():
        return out
    if not fetch:
        raise FileNotFoundError(f"{out}: the vaderSentiment sentences are not unpacked; run `make data` "
                                "(or `python -m bitsmith.zoo.sentiment`)")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                               "-d", tmp], capture_output=True, text=True)  # fmt: skip
        archives = list(Path(tmp).glob("vaderSentiment-*.tar.gz"))
        if done.returncode or not archives:
            reason = (done.stderr.strip().splitlines() or ["no sdist written"])[-1]
            raise RuntimeError(f"pip download {SDIST} failed ({reason})")
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        with tarfile.open(archives[0]) as sdist:
            inner = sdist.extractfile(INNER)
            if inner is None:
                raise RuntimeError(f"{archives[0].name} has no {INNER}")
            with tarfile.open(fileobj=inner) as data:
                for member in data.getmembers():
                    if member.isfile() and member.name.endswith("_GroundTruth.txt") and member.size < MAX_FILE_BYTES:
                        blob = data.extractfile(member)
                        (staging / Path(member.name).name).write_bytes(blob.read() if blob else b"")
        staging.rename(out)
    return out


def rated_sentences(kind: str = "movie") -> list[tuple[str, float]]:
    """``(sentence, mean human rating in [-4, 4])`` of one collection, in file order."""
    if kind not in KINDS:
        raise ValueError(f"unknown sentiment collection {kind!r}; choose one of {sorted(KINDS)}")
    path = sentiment_dir() / f"{KINDS[kind]}_GroundTruth.txt"
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3:
            try:
                out.append((parts[2].strip(), float(parts[1])))
            except ValueError:
                continue
    return out


def sentiment_split(kind: str = "movie", test_fraction: float = 0.2, seed: int = 0
                    ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:  # fmt: skip
    """Binary sentiment (1: mean rating > 0) of the sentences rated away from 0, shuffled with ``seed`` and split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    labelled = [(text, int(rating > 0)) for text, rating in rated_sentences(kind) if rating != 0]
    random.Random(seed).shuffle(labelled)
    cut = int(len(labelled) * (1 - test_fraction))
    return labelled[:cut], labelled[cut:]


if __name__ == "__main__":
    print(sentiment_dir(fetch=True))
