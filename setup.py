"""Packaging for arkbatch-beam.

Beam ships this package to Dataflow/Flink workers with ``--setup_file ./setup.py``.
"""

from setuptools import find_packages, setup

setup(
    name="arkbatch-beam",
    version="0.1.0",
    description="Large offline chat-inference jobs on Apache Beam against Volcengine Ark "
    "batch inference and any OpenAI-compatible chat endpoint.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.14",
    packages=find_packages(include=["arkbatch_beam", "arkbatch_beam.*", "pipelines", "pipelines.*"]),
    # The Beam YAML provider file (python -m arkbatch_beam.yaml_provider prints its path).
    package_data={"arkbatch_beam": ["yaml/*.yaml"]},
    install_requires=[
        "apache-beam[gcp]>=2.77.0,<2.78",
        "aiohttp>=3.12,<4",
        "pyarrow>=14.0.1,<26",
        "google-cloud-storage>=2.18.2,<4",
        "orjson>=3.9.7,<4",
        # Checks structured output (--response_format) against its JSON schema.
        "jsonschema>=4,<5",
        # The live progress bar on a terminal.
        "tqdm>=4.66,<5",
    ],
    extras_require={
        # Beam YAML pipelines (type: BatchChatInference): Beam's YAML runner and its file readers.
        "yaml": ["apache-beam[gcp,yaml]>=2.77.0,<2.78"],
        # python -m arkbatch_beam.report OUT --plot report.png / --html report.html
        "report": ["matplotlib>=3.8,<4"],
        # A faster event loop for the shared client, used when installed.
        "fast": ["uvloop>=0.19,<1"],
        "test": [
            "apache-beam[gcp,yaml]>=2.77.0,<2.78",
            "pytest>=8,<10",
            "pytest-timeout>=2.3,<3",
            "pytest-asyncio>=0.24,<2",
            "hypothesis>=6.100,<7",
            "ruff>=0.6,<1",
            "mypy>=1.10,<3",
            "psutil>=5.9,<8",
            "gcp-storage-emulator>=2024.8.3,<2028",
            # Independent parties the tests hold our client and fake server against.
            "fakellm>=0.3.5,<0.4",
            "volcengine-ark-runtime>=5,<6",
            # HTTPS in the fake server (a test CA and certificates), plots in the report.
            "trustme>=1.1,<2",
            "matplotlib>=3.8,<4",
        ],
        # Peers for `python -m benchmarks.run` (not needed by the tests).
        "bench": [
            "psutil>=5.9,<8",
            "openai>=1.40,<4",
            "volcengine-python-sdk[ark]>=4.0,<6",
            "ray[data]>=2.44,<3",
            "pydantic>=2,<3",
            "pyinstrument>=4.6,<6",
        ],
    },
)
