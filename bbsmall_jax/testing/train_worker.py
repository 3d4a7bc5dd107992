"""`python -m bbsmall_jax.testing.train_worker`: runs the shared tiny training job in a subprocess (8 fake devices, or one of several processes); prints losses."""

import argparse
import json
import os


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--fsdp", choices=["off", "on", "both"], default="off")
    parser.add_argument("--coordinator")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--packing", action="store_true", help="the shared job with packed rows")
    args = parser.parse_args()
    import jax

    if args.coordinator:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from bbsmall_jax.testing.training import read_metrics, shared_job

    from bbsmall_jax.train.loop import train

    results = {}
    for fsdp in {"off": [False], "on": [True], "both": [False, True]}[args.fsdp]:
        cfg, datasets, model_config = shared_job(fsdp=fsdp, packing=args.packing)
        directory = os.path.join(args.output_dir, f"fsdp_{fsdp}")
        train(cfg, directory, datasets, model_config)
        results[f"fsdp_{fsdp}"] = [r["loss"] for r in read_metrics(directory)]
    if jax.process_index() == 0:
        print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "losses": results}))

if __name__ == "__main__":
    main()
