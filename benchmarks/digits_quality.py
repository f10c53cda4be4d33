"""Quality of the digits model: how many class-conditional samples a real-digit classifier recognises.

    python benchmarks/digits_quality.py --workdir runs/digits            # score an existing run
    python benchmarks/digits_quality.py --workdir runs/q --train         # train configs/digits.py first
    python benchmarks/digits_quality.py --workdir runs/q --train --config.num_steps=500   # overrides as dit-jax-train

--config and --config.FIELD=VALUE are read as dit-jax-train reads them (benchmarks/config_args.py).

Trains the digits network of dit_jax/evaluation/digits.py on 80% of scikit-learn's real digits (prints its
accuracy on the other 20%), draws
`--per_class` samples of every class from the EMA weights of the newest checkpoint in --workdir (DDIM,
fixed noise seed), and prints the fraction the classifier labels as the class they were conditioned on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

from benchmarks import config_args  # noqa: E402
from dit_jax import checkpoint as ckpt_lib, train  # noqa: E402
from dit_jax.evaluation import digits as digits_eval  # noqa: E402
from dit_jax.training.samples import make_sampler  # noqa: E402

PROG = "digits_quality.py"


def evaluate(config, workdir: str, per_class: int = 50, seed: int = 1, cfg_scale=None, respacing=None):
    """-> dict with classifier_accuracy, conditional_accuracy, step, per_class_accuracy."""
    if cfg_scale is not None:
        config.sample.cfg_scale = cfg_scale
    if respacing is not None:
        config.sample.respacing = respacing
    env = train.setup(config)
    restored = train.load_latest(workdir, env, config)
    if restored is None:
        raise SystemExit(f"no checkpoint in {ckpt_lib.checkpoint_dir(workdir)}; train first (--train)")
    step, state, _ = restored
    labels = np.repeat(np.arange(config.model.num_classes, dtype=np.int32), per_class)
    s, c = config.model.input_size, config.model.in_channels
    noise = np.random.default_rng(seed).standard_normal((len(labels), s, s, c)).astype(np.float32)
    sampler = make_sampler(config, env.model, env.mesh)
    samples = sampler(state.ema_params, labels, noise)  # (N, S, S, 1) in [-1, 1]
    scorer = digits_eval.scorer()
    clf_acc = scorer.heldout_accuracy
    pred = scorer.net.predict(digits_eval.to_digit_pixels(samples) / 16.0)
    fd = scorer.score(samples, labels)["digits_fd"]
    per = {int(k): float(np.mean(pred[labels == k] == k)) for k in range(config.model.num_classes)}
    return {"step": int(step), "classifier_heldout_accuracy": clf_acc,
            "conditional_accuracy": float(np.mean(pred == labels)), "digits_fd": fd, "num_samples": int(len(labels)),
            "per_class_accuracy": per, "cfg_scale": float(config.sample.cfg_scale),
            "respacing": config.sample.respacing}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="digits", help="as dit-jax-train --config takes it (default: digits)")
    p.add_argument("--train", action="store_true", help="train (or resume) the config in --workdir first")
    p.add_argument("--per-class", "--per_class", type=int, default=50)
    p.add_argument("--seed", type=int, default=1, help="noise seed of the evaluation samples")
    p.add_argument("--cfg-scale", "--cfg_scale", type=float, default=None, help="override config.sample.cfg_scale")
    p.add_argument("--respacing", default=None, help="override config.sample.respacing (e.g. ddim100)")
    args, overrides = config_args.parse_args(p, argv)  # and any --config.FIELD=VALUE
    logging.basicConfig(level=logging.WARNING)
    config = config_args.load(PROG, args.config, overrides)
    if args.train:
        logging.getLogger("dit_jax").setLevel(logging.INFO)
        t0 = time.time()
        train.train_and_evaluate(config, args.workdir)
        print(f"training wall time: {time.time() - t0:.1f} s ({config.num_steps} steps)")
    t0 = time.time()
    res = evaluate(config, args.workdir, args.per_class, args.seed, args.cfg_scale, args.respacing)
    print(json.dumps(res, indent=1))
    print(f"real-digit classifier held-out accuracy: {res['classifier_heldout_accuracy']:.4f}")
    print(f"generated digits labelled as their conditioning class: {res['conditional_accuracy']:.4f} "
          f"({res['num_samples']} samples, EMA step {res['step']}, {res['respacing']}, cfg {res['cfg_scale']}; "
          f"eval {time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
