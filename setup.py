from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "torchvision>=0.19",
    "transformers>=5.0",
    "datasets>=3.0",
    "accelerate>=1.0",
    "evaluate>=0.4",
    "huggingface_hub>=0.34",
    "timm>=1.0",
    "safetensors>=0.4",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
    "scikit-learn>=1.2",
    "tqdm>=4.60",
]

extras = {
    "slurm": ["submitit>=1.5"],  # the study's submitit executor (hf-mae study --executor submitit)
    "dev": ["pytest>=8", "ruff>=0.6", "submitit>=1.5"],
}

setup(
    name="hf_mae",
    version="0.1.0",
    description="Masked Autoencoders (MAE) and Distilled MAE pretraining of Vision Transformers, the HuggingFace way",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["hf_mae", "hf_mae.*"]),
    package_data={
        "hf_mae": [
            "metrics/topk_accuracy/*.py",  # the offline `evaluate` metric module is loaded from its folder
            # the recipes, study grids and accelerate configs, addressable by name (hf_mae/named_configs.py); in a
            # checkout examples/configs and accelerate_configs are symlinks to these folders
            "recipes/*.yaml",
            "accelerate_configs/*.yaml",
        ]
    },
    entry_points={"console_scripts": ["hf-mae = hf_mae.cli:main"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
)
