from setuptools import find_packages, setup

setup(
    name="pyterrier-ce",
    version="0.1.0",
    description="Train and run transformer cross-encoder rerankers in PyTerrier, with every objective of the recent literature",
    long_description=open("README.md", encoding="utf8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pyterrier_ce", "pyterrier_ce.*"]),
    python_requires=">=3.10",
    install_requires=[
        "pyterrier>=1.1",
        "pyterrier-pisa",
        "pyterrier-alpha",
        "transformers>=4.45",
        "torch>=2.1",
        "ir_datasets",
        "ir_measures",
        "pandas",
        "numpy",
        "accelerate>=0.34",
        "safetensors",
        "pyyaml",
        "pyterrier-caching",  # the on-disk cache of pipeline teachers' scores
    ],
    extras_require={
        "test": ["pytest", "sentence-transformers>=4", "matplotlib", "tabulate",
                 "nbclient", "nbformat", "ipykernel"],  # the notebooks run in tests/test_notebooks.py
        "bench": ["sentence-transformers>=4", "datasets", "tabulate", "matplotlib"],
        "notebooks": ["jupyter", "nbconvert", "matplotlib", "tabulate", "sentence-transformers>=4"],
    },
    entry_points={"console_scripts": ["pyterrier-ce=pyterrier_ce.cli:main"]},
)
