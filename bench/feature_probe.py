"""Diagnostic: do a tiny backbone's image features tell toy-world scenes apart (what routing needs)?

For the first N eval records of a toy world (version 4: with `lookalike.json`), the mean-pooled
bridge output (the image tokens the LM sees, L2-normalised) of each edit image, its image rephrase,
its `m_loc` probe and its look-alike probe. Prints one JSON object:
    rephrase_top1_own            share of rephrases whose nearest edit image (cosine) is their own
    rephrase_own_cos_mean        mean cosine rephrase <-> own edit image
    rephrase_best_other_cos_mean mean cosine rephrase <-> nearest OTHER edit image
    mloc_best_edit_cos_mean      mean cosine m_loc probe <-> nearest edit image
    lookalike_own_edit_cos_mean  mean cosine look-alike probe (one attribute changed) <-> its edit image
    share_lookalike_closer_than_rephrase
LiveEdit's extractors are trained on top of these features, so this is what they can start from.
With a version-4 world it also prints "attribute_accuracy": per question type (colour, shape, count and
the pretraining-only size, companion, pattern, frame), the share of the N edit images whose true answer
the unedited backbone gets exactly right (teacher forcing, every answer token).

    python bench/feature_probe.py --world data/v4/toyworld --backbone records/pretrained/tiny-blip2-<key> -n 1000
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from editors.vllms import load_vllm  # noqa: E402
from runs.neighbours import image_keys  # noqa: E402
from utils.images import load_image  # noqa: E402


def features(vllm, world: str, paths: list[str], chunk: int = 128) -> torch.Tensor:
    """[n, D] `runs.neighbours.image_keys` of the images `paths` (relative to `world`)."""
    return torch.cat([image_keys(vllm, [load_image(os.path.join(world, p)) for p in paths[i:i + chunk]])
                      for i in range(0, len(paths), chunk)])


def probe(vllm, world: str, n: int) -> dict:
    with open(os.path.join(world, "eval.json")) as f:
        records = json.load(f)[:n]
    n = len(records)
    edit = features(vllm, world, [r["image"] for r in records])  # [n, D]
    reph = features(vllm, world, [r["image_rephrase"] for r in records])  # [n, D]
    mloc = features(vllm, world, [r["m_loc"] for r in records])  # [n, D]
    sim = reph @ edit.T  # [n, n]
    own = sim.diag()
    other = sim.clone().fill_diagonal_(-2.0)
    out = {"n": n,
           "rephrase_top1_own": float((sim.argmax(1) == torch.arange(n)).float().mean()),
           "rephrase_own_cos_mean": float(own.mean()),
           "rephrase_best_other_cos_mean": float(other.max(1).values.mean()),
           "mloc_best_edit_cos_mean": float((mloc @ edit.T).max(1).values.mean())}
    look_path = os.path.join(world, "lookalike.json")
    if os.path.isfile(look_path):
        with open(look_path) as f:
            look = features(vllm, world, [r["m_loc"] for r in json.load(f)[:n]])  # [n, D]
        look_own = (look * edit).sum(1)  # [n]
        out["lookalike_own_edit_cos_mean"] = float(look_own.mean())
        out["share_lookalike_closer_than_rephrase"] = float((look_own > own).float().mean())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


@torch.no_grad()
def attribute_accuracy(vllm, world: str, n: int, batch_size: int = 64) -> dict[str, float]:
    """Question type -> exact teacher-forced accuracy on the first `n` eval edit images (v4 worlds)."""
    from toyworld.world import QUESTIONS, vqa_prompt
    from toyworld.world_v4 import PRETRAIN_QUESTIONS, SceneV4
    with open(os.path.join(world, "eval.json")) as f:
        paths = [r["image"] for r in json.load(f)[:n]]
    with open(os.path.join(world, "scenes.json")) as f:
        scenes = json.load(f)
    images = [load_image(os.path.join(world, p)) for p in paths]
    out = {}
    for qtype, questions in {**QUESTIONS, **PRETRAIN_QUESTIONS}.items():
        right = 0
        for i in range(0, len(paths), batch_size):
            chunk = list(range(i, min(i + batch_size, len(paths))))
            targets = [SceneV4(**scenes[paths[j]]).answer(qtype) for j in chunk]
            batch = vllm.prepare([vqa_prompt(questions[0])] * len(chunk), [images[j] for j in chunk], targets)
            hits = (vllm(batch).argmax(-1) == batch.labels) | ~batch.label_mask  # [b, l]
            right += int(hits.all(1).sum())
        out[qtype] = round(right / len(paths), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", required=True, help="toy world folder (with eval.json)")
    p.add_argument("--backbone", required=True, help="pretrained tiny-blip2 folder")
    p.add_argument("--model", default="tiny-blip2")
    p.add_argument("-n", type=int, default=1000, help="eval records (default 1000)")
    ns = p.parse_args(argv)
    vllm = load_vllm(ns.model, path=ns.backbone)
    result = probe(vllm, ns.world, ns.n)
    if os.path.isfile(os.path.join(ns.world, "lookalike.json")):
        result["attribute_accuracy"] = attribute_accuracy(vllm, ns.world, ns.n)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
