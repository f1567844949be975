"""Compression level trade-off on a WAL corpus: stored bytes and single-core encode/decode speed
through walship's own codec.   python bench/codec_levels.py CORPUS_DIR [--levels 1,3,6]"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

from walship.codec import Codec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--levels", default="1,2,3,4,6,9")
    args = parser.parse_args()
    files = sorted(p for p in args.corpus.iterdir() if p.is_file())
    data = [p.read_bytes() for p in files]
    total = sum(map(len, data))
    print(f"{len(files)} files, {total / 2**20:.0f} MiB")
    print("level  stored MiB  ratio  encode ms/seg (median)  decode ms/seg (median)")
    for level in map(int, args.levels.split(",")):
        codec = Codec(level=level)
        stored, enc, dec = 0, [], []
        for name, plain in zip(files, data):
            key = f"wal/{name.name}"
            t = time.perf_counter()
            form = codec.stored_form(key, [plain], size_hint=len(plain))
            blob = b"".join(form)
            enc.append(time.perf_counter() - t)
            stored += len(blob)
            t = time.perf_counter()
            for _ in codec.decode(key, io.BytesIO(blob), form.metadata()):
                pass
            dec.append(time.perf_counter() - t)
        print(f"{level:5}  {stored / 2**20:10.1f}  {total / stored:5.1f}  "
              f"{statistics.median(enc) * 1000:22.1f}  {statistics.median(dec) * 1000:22.1f}")


if __name__ == "__main__":
    main()
