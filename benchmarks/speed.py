"""Speed of the reference CNN (float32 vs the default path) and of `hevisum run` on real data.

    python benchmarks/speed.py [--batches 6] [--skip-run]

1. hevisum-cnn training (forward + backward + AdamW step) and inference spots/s on 78 px tiles, float32 against
   the default path (`train.precision = "auto"`: bfloat16 autocast on a CPU, mixed precision on a GPU), measured
   in the same process, interleaved, medians over several rounds (training: one batch per round; inference: one
   prediction call over 8 batches per round, as `hevisum predict` runs it).
2. Wall time of `hevisum run ../shared/data/challenge/her2st.h5 --profile fast`.
The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HER2ST = (REPO / ".." / "shared" / "data" / "challenge" / "her2st.h5").resolve()


def time_cnn(batches: int, batch_size: int, device: str) -> dict:
    import numpy as np
    import torch

    from hevisum.losses import make_loss
    from hevisum.models import normalise_uint8
    from hevisum.models.factory import create_model
    from hevisum.training import autocast_dtype, predict_tiles

    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (batch_size, 78, 78, 3), dtype=np.uint8))
    target = torch.rand(batch_size, 35)
    loss_fn = make_loss("hybrid")
    results: dict[str, dict[str, list[float]]] = {}
    paths = {"fp32": None, "default": autocast_dtype("auto", device)}
    models = {}
    for name in paths:
        torch.manual_seed(0)
        m = create_model("hevisum-cnn", 35).to(device)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-3))
        results[name] = {"train": [], "infer": []}
    # Inference is timed as it is used: one predict_tiles call over many tiles (here 8 batches), so one-time
    # set-up (the default path's bfloat16 weight copy, the DataLoader) is amortised as in `hevisum predict`.
    infer_tiles = rng.integers(0, 256, (8 * batch_size, 78, 78, 3), dtype=np.uint8)
    rows = np.arange(len(infer_tiles))
    dev_type = device.split(":")[0]

    def sync():
        if dev_type == "cuda":
            torch.cuda.synchronize()

    for i in range(batches + 1):  # the first round warms up and is dropped
        for name, dtype in paths.items():
            m, opt = models[name]
            m.train()
            x = normalise_uint8(tiles.to(device))
            sync()
            t0 = time.perf_counter()
            with torch.autocast(device_type=dev_type, dtype=dtype, enabled=dtype is not None):
                pred = m(x)
            loss = loss_fn(pred.float(), target.to(device), 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            t1 = time.perf_counter()
            # Inference through the library's own path (what `hevisum predict` runs).
            predict_tiles(m, infer_tiles, rows, batch_size=batch_size, device=device,
                          precision="fp32" if dtype is None else "auto")
            sync()
            t2 = time.perf_counter()
            if i:
                results[name]["train"].append(batch_size / (t1 - t0))
                results[name]["infer"].append(len(rows) / (t2 - t1))
    out = {}
    for name in paths:
        out[name] = {k: statistics.median(v) for k, v in results[name].items()}
    out["speedup_train"] = out["default"]["train"] / out["fp32"]["train"]
    out["speedup_infer"] = out["default"]["infer"] / out["fp32"]["infer"]
    out["default_dtype"] = str(paths["default"]).replace("torch.", "") if paths["default"] is not None else "float32"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per path (median)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-run", action="store_true", help="skip the hevisum run timing")
    args = ap.parse_args()
    from hevisum.training import resolve_device

    device = resolve_device(args.device)
    import torch

    result: dict = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    cnn = time_cnn(args.batches, args.batch_size, device)
    result["hevisum_cnn"] = cnn
    print(f"hevisum-cnn on {device}, batch {args.batch_size}, 78 px tiles (median of {args.batches} rounds)")
    print(f"{'path':<24}{'train spots/s':>15}{'infer spots/s':>15}")
    print(f"{'float32':<24}{cnn['fp32']['train']:>15.1f}{cnn['fp32']['infer']:>15.1f}")
    print(f"{'default (' + cnn['default_dtype'] + ')':<24}{cnn['default']['train']:>15.1f}{cnn['default']['infer']:>15.1f}")
    print(f"{'speed-up':<24}{cnn['speedup_train']:>14.2f}x{cnn['speedup_infer']:>14.2f}x")
    if not args.skip_run:
        if not HER2ST.is_file():
            print(f"real data not found at {HER2ST}: skipping the run timing", file=sys.stderr)
        else:
            from hevisum.pipeline import run_pipeline

            with tempfile.TemporaryDirectory() as tmp:
                import os

                os.environ["HEVISUM_CACHE"] = tmp  # a cold feature cache: time the whole job
                t0 = time.perf_counter()
                m = run_pipeline([str(HER2ST)], Path(tmp) / "run", profile="fast", device=device, progress=False)
                wall = time.perf_counter() - t0
            result["run_her2st_fast"] = {"wall_s": wall, "n_train_spots": m["n_train_spots"],
                                         "n_test_spots": m["n_test_spots"], "selected": m["selected"]}
            print(f"hevisum run her2st.h5 --profile fast: {wall:.1f} s wall "
                  f"({m['n_train_spots']} training + {m['n_test_spots']} test spots)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
