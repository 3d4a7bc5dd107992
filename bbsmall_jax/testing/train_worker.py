"""`python -m bbsmall_jax.testing.train_worker`: runs the shared tiny training job in a subprocess (8 fake devices, or one of several processes); prints losses."""

import argparse
import json
import os

import numpy as np


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--fsdp", choices=["off", "on", "both"], default="off")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--packing", action="store_true", help="the shared job with packed rows")
    parser.add_argument("--corpus", help="a sharded corpus directory: train on it (with --tokenizer), then again "
                        "killed after 4 steps and resumed; prints both runs' losses and each process's shards")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    import jax

    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from bbsmall_jax.testing.training import read_metrics, shared_job

    from bbsmall_jax.train.loop import train

    if args.corpus:
        return streamed(args)
    results = {}
    for fsdp in {"off": [False], "on": [True], "both": [False, True]}[args.fsdp]:
        cfg, datasets, model_config = shared_job(fsdp=fsdp, packing=args.packing)
        directory = os.path.join(args.output_dir, f"fsdp_{fsdp}")
        train(cfg, directory, datasets, model_config)
        results[f"fsdp_{fsdp}"] = [r["loss"] for r in read_metrics(directory)]
    if jax.process_index() == 0:
        print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "losses": results}))


def streamed(args):
    """The shared job on a sharded corpus, whole and killed-then-resumed, in this process and its peers."""
    import shutil

    import jax

    from bbsmall_jax.testing.corpora import streaming_job
    from bbsmall_jax.testing.training import read_metrics
    from bbsmall_jax.train.loop import train
    from bbsmall_jax.train.preparation import prepare_datasets

    cfg = streaming_job(args.corpus, args.tokenizer, args.packing)
    whole, cut = (os.path.join(args.output_dir, name) for name in ("whole", "cut"))
    train(cfg, whole)
    train(cfg.replace(max_steps=4), cut)
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(cut, "checkpoints", "4"))  # killed before step 4's save completed
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("cut")
    train(cfg, cut)
    shards = prepare_datasets(cfg, cut, True, cfg.model_config()).train.shards
    numbers = [int(os.path.basename(path).split(".")[0][len("part-"):]) for path in shards]  # part-00003.jsonl: 3
    share = multihost_utils.process_allgather(np.array(numbers))
    if jax.process_index() == 0:
        print(json.dumps({"processes": jax.process_count(), "shards": np.asarray(share).tolist(),
                          "whole": [r["loss"] for r in read_metrics(whole)],
                          "resumed": [r["loss"] for r in read_metrics(cut)]}))


if __name__ == "__main__":
    main()
