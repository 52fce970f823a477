"""fsaf_d2: the FSAF detector (CVPR 2019) as a Detectron2 plugin.

Detectron2 itself is not declared: it has no official PyPI release. ``scripts/setup_env.sh`` installs it
(sal-detectron2 0.7.2, or keeps an upstream install); see README.md.
"""
import os

from setuptools import find_packages, setup


def read_version():
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "fsaf_d2", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("fsaf_d2/__init__.py has no __version__")


setup(
    name="fsaf_d2",
    version=read_version(),
    description="FSAF (Feature Selective Anchor-Free) detector as a Detectron2 plugin, for CUDA, Ascend NPU and CPU",
    # The command-line programs live in tools/ and run there as `python tools/<name>.py`, next to the
    # repository's configs/. A wheel has no tools/ folder, so it ships them as the subpackage fsaf_d2.tools
    # (package_dir), as Detectron2's setup.py ships projects/ as detectron2.projects.*; the console scripts
    # below call their main() (or cli(), where main() returns a result rather than an exit status). An editable
    # install maps fsaf_d2.tools to tools/ the same way.
    # The configs ship the same way, as package data of fsaf_d2.model_zoo.configs (configs/ itself), for
    # fsaf_d2.model_zoo.get_config_file() and the tools' defaults; a clone reads configs/ directly.
    packages=find_packages(exclude=("configs", "tests", "tests.*", "scripts", "tools", "tools.*"))
    + ["fsaf_d2.tools", "fsaf_d2.model_zoo.configs"],
    package_dir={"fsaf_d2.tools": "tools", "fsaf_d2.model_zoo.configs": "configs"},
    package_data={"fsaf_d2.model_zoo.configs": ["*.yaml", "*.py", "common/*.py"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "faster-coco-eval>=1.6",
        "numpy",
        "Pillow>=7.1",
        "tqdm",
        "tabulate",
    ],
    extras_require={
        "vis": ["opencv-python-headless"],
        "export": ["onnx>=1.16", "onnxruntime>=1.17"],
        "test": ["pytest", "pytest-timeout"],
        "cluster": ["submitit>=1.5"],  # tools/submit_slurm.py, fsaf_d2.engine.cluster
    },
    entry_points={
        "console_scripts": [
            "fsaf-convert-mmdet=fsaf_d2.tools.convert_mmdet:main",
            "fsaf-benchmark=fsaf_d2.tools.benchmark:main",
            "fsaf-benchmark-data=fsaf_d2.tools.benchmark_data:main",
            "fsaf-benchmark-eval=fsaf_d2.tools.benchmark_eval:main",
            "fsaf-benchmark-inference=fsaf_d2.tools.benchmark_inference:main",
            "fsaf-demo=fsaf_d2.tools.demo:cli",
            "fsaf-export=fsaf_d2.tools.export:cli",
            "fsaf-train=fsaf_d2.train_net:cli",
            "fsaf-lazy-train=fsaf_d2.tools.lazyconfig_train_net:cli",
        ]
    },
)
