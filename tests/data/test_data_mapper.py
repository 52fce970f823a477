"""FSAFDatasetMapper: resize backends, crowd policy, output format; loader determinism."""
import itertools

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from fsaf_data_helpers import image_path, loader_cfg

from fsaf_d2.data import (
    CV2Resize,
    CV2ResizeTransform,
    FSAFDatasetMapper,
    build_fsaf_test_loader,
    build_fsaf_train_loader,
)
from fsaf_d2.data.transforms import apply_resize_backend


def _record(root, boxes, crowd=(), index=1):
    from PIL import Image

    path = image_path(root, index=index)
    with Image.open(path) as im:
        w, h = im.size
    return {
        "file_name": path,
        "width": w,
        "height": h,
        "image_id": index,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYXY_ABS, "category_id": i % 5, "iscrowd": int(i in crowd)}
            for i, b in enumerate(boxes)
        ],
    }


# ------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("shape", [(160, 144), (128, 160), (333, 517), (800, 1201)])
@pytest.mark.parametrize("size", [(100, 1333), (800, 1333), (240, 300)])
def test_cv2_resize_gives_the_same_size_as_pil(shape, size):
    image = np.random.RandomState(0).randint(0, 256, size=shape + (3,), dtype=np.uint8)
    pil = T.ResizeShortestEdge(size[0], size[1], "choice")
    cv2_aug = apply_resize_backend([pil], "cv2")[0]
    assert isinstance(cv2_aug, CV2Resize)
    out_pil = T.AugmentationList([pil])(T.AugInput(image.copy()))
    in_cv2 = T.AugInput(image.copy())
    out_cv2 = T.AugmentationList([cv2_aug])(in_cv2)
    assert isinstance(out_cv2[0], CV2ResizeTransform)
    assert (out_pil[0].new_h, out_pil[0].new_w) == (out_cv2[0].new_h, out_cv2[0].new_w)
    assert in_cv2.image.shape == (out_pil[0].new_h, out_pil[0].new_w, 3) and in_cv2.image.dtype == np.uint8
    boxes = np.array([[3.0, 4.0, 50.5, 60.25]])
    np.testing.assert_allclose(out_pil.apply_box(boxes), out_cv2.apply_box(boxes))


def test_cv2_resize_matches_opencv_and_differs_from_pil_when_downscaling():
    import cv2

    image = np.random.RandomState(1).randint(0, 256, size=(120, 90, 3), dtype=np.uint8)
    tfm = CV2ResizeTransform(120, 90, 50, 37)
    expected = cv2.resize(image, (37, 50), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(tfm.apply_image(image), expected)
    pil = T.ResizeTransform(120, 90, 50, 37).apply_image(image)
    assert pil.shape == expected.shape and np.abs(pil.astype(int) - expected).mean() > 1  # PIL antialiases
    assert tfm.apply_image(image[:, :, :1]).shape == (50, 37, 1)
    seg = (np.arange(120 * 90).reshape(120, 90) % 7).astype(np.uint8)
    assert set(np.unique(tfm.apply_segmentation(seg))) <= set(range(7))
    inv = tfm.inverse()
    assert isinstance(inv, CV2ResizeTransform) and (inv.new_h, inv.new_w) == (120, 90)


@pytest.mark.parametrize("is_train", [True, False])
def test_mapper_backends_same_output_size(small_quickstart, is_train):
    root = small_quickstart[0]
    record = _record(root, [[10, 10, 40, 50]])
    outs = {}
    for backend in ("pil", "cv2"):
        cfg = loader_cfg(
            **{
                "INPUT.RESIZE_BACKEND": backend,
                "INPUT.MIN_SIZE_TEST": 200,
                "INPUT.MIN_SIZE_TRAIN": (200,),
                "INPUT.RANDOM_FLIP": "none",
            }
        )
        mapper = FSAFDatasetMapper(cfg, is_train)
        has_cv2 = any(isinstance(a, CV2Resize) for a in mapper.augmentations.augs)
        assert has_cv2 == (backend == "cv2")
        outs[backend] = mapper(record)
    assert outs["pil"]["image"].shape == outs["cv2"]["image"].shape
    assert min(outs["pil"]["image"].shape[1:]) == 200
    assert not torch.equal(outs["pil"]["image"], outs["cv2"]["image"])
    if is_train:
        assert torch.allclose(outs["pil"]["instances"].gt_boxes.tensor, outs["cv2"]["instances"].gt_boxes.tensor)
    else:
        assert "instances" not in outs["pil"] and "annotations" not in outs["pil"]


def test_invalid_resize_backend_names_the_key():
    with pytest.raises(ValueError, match="INPUT.RESIZE_BACKEND='opencv'"):
        FSAFDatasetMapper(loader_cfg(**{"INPUT.RESIZE_BACKEND": "opencv"}), True)


# ------------------------------------------------------------------------------------------ crowd
def test_crowd_boxes_dropped_by_default(small_quickstart):
    record = _record(small_quickstart[0], [[10, 10, 40, 50], [60, 20, 90, 70], [5, 80, 100, 120]], crowd=(1,))
    cfg = loader_cfg(**{"INPUT.RANDOM_FLIP": "none", "INPUT.MIN_SIZE_TRAIN": (record["height"],)})
    out = FSAFDatasetMapper(cfg, True)(record)
    inst = out["instances"]
    assert len(inst) == 2 and not inst.has("gt_is_crowd")
    assert inst.gt_classes.tolist() == [0, 2]


def test_crowd_boxes_kept_and_flagged_with_crowd_as_ignore(small_quickstart):
    record = _record(small_quickstart[0], [[10, 10, 40, 50], [60, 20, 90, 70], [5, 80, 100, 120]], crowd=(1,))
    h = record["height"]
    cfg = loader_cfg(**{"INPUT.RANDOM_FLIP": "none", "INPUT.MIN_SIZE_TRAIN": (2 * h,), "INPUT.MAX_SIZE_TRAIN": 10000})
    cfg.MODEL.FSAF.CROWD_AS_IGNORE = True
    out = FSAFDatasetMapper(cfg, True)(record)
    inst = out["instances"]
    assert len(inst) == 3 and inst.gt_is_crowd.dtype == torch.bool
    assert inst.gt_is_crowd.tolist() == [False, True, False]
    assert inst.gt_classes.tolist() == [0, 1, 2]
    sy, sx = (out["image"].shape[1] / record["height"], out["image"].shape[2] / record["width"])
    torch.testing.assert_close(inst.gt_boxes.tensor[1], torch.tensor([60 * sx, 20 * sy, 90 * sx, 70 * sy]))
    # empty boxes are filtered together with their flag: a zero-width non-crowd box before the crowd box
    record["annotations"].insert(1, dict(record["annotations"][0], bbox=[30, 30, 30, 60], category_id=3))
    inst = FSAFDatasetMapper(cfg, True)(record)["instances"]
    assert inst.gt_classes.tolist() == [0, 1, 2] and inst.gt_is_crowd.tolist() == [False, True, False]
    # test-time mapping never produces instances
    assert "instances" not in FSAFDatasetMapper(cfg, False)(record)


# ------------------------------------------------------------------------------------------ loaders
def _image_ids(loader, num_batches):
    return [[d["image_id"] for d in batch] for batch in itertools.islice(loader, num_batches)]


def test_train_loader_is_deterministic_with_seed(registered_small_quickstart):
    def run(seed):
        cfg = loader_cfg(**{"SEED": seed, "DATALOADER.ASPECT_RATIO_GROUPING": False})
        return _image_ids(build_fsaf_train_loader(cfg), 6)

    first = run(3)
    assert first == run(3)
    assert first != run(4)
    batch = next(iter(build_fsaf_train_loader(loader_cfg())))
    assert len(batch) == 2
    for d in batch:
        assert d["image"].dtype == torch.uint8 and d["image"].shape[0] == 3
        assert d["instances"].gt_boxes.tensor.shape[1] == 4 and len(d["instances"]) >= 1


def test_train_loader_workers_draw_another_stream_on_every_rank(registered_small_quickstart, monkeypatch):
    """Ranks share the sampler's seed (they split one image order) but not the workers' random stream:
    with one stream, corresponding images of every rank would be flipped alike."""
    from detectron2.utils import comm

    seeds = {}
    for rank in (0, 1):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        loader = build_fsaf_train_loader(loader_cfg(**{"SEED": 3, "DATALOADER.ASPECT_RATIO_GROUPING": False}))
        seeds[rank] = (loader.generator.initial_seed(), loader.dataset.sampler._seed)
    assert seeds == {0: (3, 3), 1: (4, 3)}


@pytest.mark.parametrize("device,pin,grouping,pinned", [
    ("cpu", True, True, False),  # nothing to copy to
    ("cuda", True, True, True),
    ("cuda", True, False, True),
    ("npu:1", True, True, True),
    ("cuda", False, True, False),
])
def test_train_loader_pins_memory_for_devices_with_their_own(registered_small_quickstart, device, pin, grouping,
                                                            pinned):
    cfg = loader_cfg(**{"MODEL.DEVICE": device, "DATALOADER.PIN_MEMORY": pin,
                        "DATALOADER.ASPECT_RATIO_GROUPING": grouping})
    loader = build_fsaf_train_loader(cfg)
    torch_loader = loader if isinstance(loader, torch.utils.data.DataLoader) else loader.dataset
    assert isinstance(torch_loader, torch.utils.data.DataLoader) and torch_loader.pin_memory is pinned


def test_test_loader_serves_every_image_once(registered_small_quickstart, small_quickstart):
    loader = build_fsaf_test_loader(loader_cfg(), "fsaf_quickstart_val")
    ids = [d["image_id"] for batch in loader for d in batch]
    assert sorted(ids) == [img["id"] for img in small_quickstart[1]["val"]["images"]]
