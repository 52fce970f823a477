#!/usr/bin/env python
"""How much of the FSAF training step torch.compile captures, static vs dynamic shapes (torch._dynamo.explain).

    python tools/compile_report.py [--size 256x320] [--batch 2] [--config-file configs/fsaf_R50_FPN_1x.yaml]

Prints, for the static path (INPUT.FIXED_SIZES + MODEL.FSAF.MAX_GT) and the dynamic path, the number of
graphs and graph breaks of (a) the loss computation from head outputs (assignment, selection, losses) and
(b) backbone + head + loss from preprocessed images and padded ground truth, with the break reasons; for the
static path also (c) ``FSAF.static_training_losses``, the unit that ``SOLVER.COMPILE`` compiles.
The model is the config's FSAF on a ResNet-18 with BN, 3 classes, on the CPU.
"""
import argparse

import torch
import fsaf_d2  # noqa: F401  (first: registers FSAF, and Detectron2's import-time warnings stay quiet)
from detectron2.modeling import build_model

from fsaf_d2.benchmarking import TINY_MODEL_OPTS, training_input
from fsaf_d2.engine import build_config
from fsaf_d2.model_zoo import get_config_file
from fsaf_d2.modeling.losses import fsaf_losses

#: the repository's configs/, next to tools/


def report(name, fn, *args):
    e = torch._dynamo.explain(fn)(*args)
    reasons = sorted({str(b.reason).splitlines()[0][:120] for b in e.break_reasons})
    print(f"{name}: graphs={e.graph_count} graph_breaks={e.graph_break_count}")
    for r in reasons:
        print(f"    break: {r}")
    torch._dynamo.reset()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="256x320")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--config-file", default=get_config_file("fsaf_R50_FPN_1x.yaml"))
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    two_boxes = [[10, 10, 90, 120], [40, 40, 60, 70]]
    batch = [training_input(h - 32 * (i % 2), w, two_boxes, [0, 2], seed=i) for i in range(args.batch)]
    for mode, opts in (("static", ["INPUT.FIXED_SIZES", [[h, w], [w, h]], "MODEL.FSAF.MAX_GT", 8]), ("dynamic", [])):
        torch.manual_seed(0)
        model = build_model(build_config(args.config_file, TINY_MODEL_OPTS + opts)).train()
        images = model.preprocess_image(batch)
        gt = model.padded_ground_truth([x["instances"] for x in batch])[:3]
        feats, head_outputs = model.features_and_predictions(images.tensor)
        priors, level, sizes, valid = model.prior_layout(images, feats)

        def loss_from_head(logits, deltas, boxes, labels, gt_valid, layout=(priors, level, sizes, valid)):
            p, lv, sz, va = layout
            out = fsaf_losses(logits, deltas, p, sz, lv, va, boxes, labels, gt_valid, box_coder=model.box_coder,
                              settings=model.loss_settings)
            return out["loss_fsaf_cls"] + out["loss_fsaf_reg"]

        def step_from_images(image_tensor, layout, boxes, labels, gt_valid):
            """Priors, level ids and the valid-prior mask are inputs: they depend on Python sizes that stay
            outside the graph (in training they come from the cached PointPriors)."""
            _, outputs = model.features_and_predictions(image_tensor)
            logits, deltas = model._transpose_dense_predictions(outputs[:2], [model.num_classes, 4])
            return loss_from_head(torch.cat(logits, 1), torch.cat(deltas, 1), boxes, labels, gt_valid, layout)

        def layout_of(images):
            f = model.backbone(images.tensor)  # prior layout needs only the feature shapes: no head
            return model.prior_layout(images, [f[k] for k in model.head_in_features])

        logits, deltas = model._transpose_dense_predictions(head_outputs[:2], [model.num_classes, 4])
        report(f"{mode}: assignment + selection + losses", loss_from_head,
               torch.cat(logits, 1).detach(), torch.cat(deltas, 1).detach(), *gt)
        report(f"{mode}: backbone + head + losses", step_from_images, images.tensor, (priors, level, sizes, valid), *gt)
        if mode == "static":  # what SOLVER.COMPILE compiles: the layout is computed inside, from tensors
            image_sizes = torch.tensor(images.image_sizes)
            report("static: SOLVER.COMPILE's step (FSAF.static_training_losses)", model.static_training_losses,
                   images.tensor, image_sizes, *model.padded_ground_truth([x["instances"] for x in batch]))

        # compilations over three batches of different image sizes and object counts
        from torch._dynamo.utils import counters

        counters.clear()
        compiled = torch.compile(step_from_images, backend="eager", dynamic=False)
        boxes = [[10, 10, 90, 120], [40, 40, 60, 70], [5, 5, 30, 30]]
        for k, (dh, dw, n) in enumerate(((0, 0, 2), (-32, -64, 3), (-64, -32, 1))):
            b = [training_input(h + dh, w + dw, boxes[:n], [0, 2, 1][:n], seed=k)]
            imgs = model.preprocess_image(b)
            p_, l_, s_, v_ = layout_of(imgs)
            compiled(imgs.tensor, (p_, l_, s_, v_), *model.padded_ground_truth([x["instances"] for x in b])[:3])
        print(f"{mode}: graphs compiled for 3 batches of different sizes / object counts: "
              f"{counters['stats']['unique_graphs']}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
