from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.1.0",
    description="Stable Diffusion v1 (CompVis latent diffusion), faithful and offline-first",
    packages=find_packages(include=["ldm", "ldm.*"]),
    package_data={"ldm.modules.encoders": ["clip_tokenizer/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "pytorch-lightning>=2.0",
        "omegaconf>=2.1",
        "transformers>=5.0",
        "tokenizers>=0.21",  # used directly by the OpenVINO backend's runs from the cache (transformers needs it too)
        "einops",
        "invisible-watermark>=0.2.0",
        "numpy",
        "pillow",
        "tqdm",
        "safetensors>=0.4",
        "openvino>=2025.0; python_version < '3.15' and ((sys_platform == 'linux' and (platform_machine == 'x86_64' "
        "or platform_machine == 'aarch64')) or (sys_platform == 'win32' and platform_machine == 'AMD64') "
        "or (sys_platform == 'darwin' and platform_machine == 'arm64'))",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "ruff", "diffusers"],
    },
)
