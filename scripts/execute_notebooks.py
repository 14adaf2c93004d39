"""Execute the notebooks in place (outputs and images saved into the .ipynb), with nbclient.

    python scripts/execute_notebooks.py [notebooks/ablation.ipynb notebooks/routing_analysis.ipynb] [--timeout 600]

The notebooks read the committed results folder ``MOELORA_RESULTS`` (default
``experiments/studies/cpu_ablation/results``: the ``ablation_*`` files written by
``experiments/studies/cpu_ablation/driver.py``), relative to the repository root; set it to point at another ablation.
Each notebook runs with its own folder as the working directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [ROOT / "notebooks" / "ablation.ipynb", ROOT / "notebooks" / "routing_analysis.ipynb"]


def kernel_name() -> str:
    """``python3`` (ipykernel's own spec, which jupyter_client finds even when no kernel.json was installed)."""
    from jupyter_client.kernelspec import KernelSpecManager

    KernelSpecManager().get_kernel_spec("python3")  # raises NoSuchKernel with a clear message if ipykernel is missing
    return "python3"


def execute(path: Path, timeout: int = 600, write: bool = True) -> object:
    """Run every cell of ``path`` in a fresh python3 kernel; save the outputs back into it when ``write``."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name(),
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    if write:
        nbformat.write(nb, path)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        start = time.perf_counter()
        execute(path.resolve(), args.timeout)
        print(f"executed {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
