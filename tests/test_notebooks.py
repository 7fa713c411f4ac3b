"""Every notebook in colab/ runs top to bottom (nbclient, CPU) with CI-sized parameters.

The cell tagged `parameters` holds each notebook's defaults; like papermill, a cell with the
overrides below is inserted right after it. Tiny settings: a converted tiny DQ-VAE
(`stage1_util.make_tiny_stage1`, 32 px) wherever a checkpoint can be given, a few training steps
where the notebook trains, and a few images. generate.ipynb trains a tiny DQ-Transformer whose
workdir evaluate.ipynb then scores. Notebooks in the repository must carry no outputs.
"""
import glob
import os
import tempfile
import time

import jax
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


COLAB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")
NOTEBOOKS = ("tokenize.ipynb", "generate.ipynb", "evaluate.ipynb")
CELL_TIMEOUT_S = 300
INJECTED_TAG = "injected-parameters"


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(COLAB_DIR, name), as_version=4)


def _inject(notebook: nbformat.NotebookNode, overrides: dict) -> nbformat.NotebookNode:
  """Inserts `NAME = repr(value)` lines after the cell tagged 'parameters'."""
  tagged = [i for i, cell in enumerate(notebook.cells)
            if "parameters" in cell.get("metadata", {}).get("tags", [])]
  assert len(tagged) == 1, "each notebook needs exactly one cell tagged 'parameters'"
  unknown = [name for name in overrides if f"\n{name} =" not in "\n" + notebook.cells[
      tagged[0]].source]
  assert not unknown, f"overrides {unknown} are not parameters of the notebook"
  source = "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = [INJECTED_TAG]
  notebook.cells.insert(tagged[0] + 1, cell)
  return notebook


def kernel_env() -> dict:
  """This environment for the kernel, less conftest's fake device count (a notebook sees the
  one CPU device Colab's CPU runtime has), with a persistent compilation cache shared by the
  notebooks of this session."""
  env = dict(os.environ)
  flags = [flag for flag in env.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir
                 or tempfile.mkdtemp(prefix="dq_nb_cache_"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  return env


def run_notebook(name: str, overrides: dict, cwd: str) -> tuple[nbformat.NotebookNode, float]:
  """Executes colab/NAME with `overrides` in `cwd`; fails with the failing cell's error."""
  notebook = _inject(_read(name), overrides)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                          resources={"metadata": {"path": cwd}})
  start = time.perf_counter()
  try:
    client.execute(env=kernel_env())
  except CellExecutionError as error:
    pytest.fail(f"{name} failed:\n{error}", pytrace=False)
  finally:  # the executed copy, for a look at what went wrong
    nbformat.write(notebook, os.path.join(cwd, f"executed_{name}"))
  return notebook, time.perf_counter() - start


def _outputs_text(notebook: nbformat.NotebookNode) -> str:
  parts = []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      parts.append(output.get("text", ""))
      parts.append(str(output.get("data", {}).get("text/plain", "")))
  return "\n".join(parts)


@pytest.fixture(scope="module")
def tiny_stage1(tiny_stage1_dir):
  return tiny_stage1_dir


@pytest.fixture(scope="module")
def generate_run(tiny_stage1, tmp_path_factory):
  """generate.ipynb on the tiny DQ-VAE: (executed notebook, seconds, workdir)."""
  workdir = str(tmp_path_factory.mktemp("generate"))
  notebook, seconds = run_notebook("generate.ipynb", {
      "STAGE1_CHECKPOINT": tiny_stage1, "STEPS": 4, "NUM_SAMPLES": 4, "WORKDIR": workdir,
      "MODEL": {"n_embd": 32, "n_head": 2, "position_layers": 1, "content_layers": 1},
      "BATCH_SIZE": 4}, workdir)
  return notebook, seconds, workdir


def test_notebooks_in_repo_have_no_outputs():
  found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(COLAB_DIR, "*.ipynb")))
  assert found == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    notebook = _read(name)
    nbformat.validate(notebook)
    for cell in notebook.cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: commit notebooks with outputs stripped")


def test_tokenize_notebook(tmp_path):
  """Trains the demo DQ-VAE for a few steps, tokenizes the embedded photo."""
  notebook, seconds = run_notebook("tokenize.ipynb", {
      "STEPS": 3, "WORKDIR": str(tmp_path), "NUM_IMAGES": 16}, str(tmp_path))
  text = _outputs_text(notebook)
  assert "DQ-VAE: 3 steps" in text
  for png in ("tokenized/astronaut_grain.png", "tokenized/astronaut_reconstruction.png",
              "reconstructions.png", "code_histogram.png", "fine_ratio_distribution.png"):
    assert os.path.isfile(tmp_path / png), png
  assert seconds < 240, f"tokenize.ipynb took {seconds:.0f} s"


def test_generate_notebook(generate_run):
  notebook, seconds, workdir = generate_run
  text = _outputs_text(notebook)
  assert "DQ-Transformer: 4 steps" in text
  for name in ("generation_strip.png", "generation.gif", "samples_t1.0.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert seconds < 240, f"generate.ipynb took {seconds:.0f} s"


def test_evaluate_notebook(tiny_stage1, generate_run, tmp_path):
  """rFID of the tiny DQ-VAE and FID of the tiny transformer from generate.ipynb."""
  transformer = os.path.join(generate_run[2], "transformer")
  notebook, seconds = run_notebook("evaluate.ipynb", {
      "STAGE1_CHECKPOINT": tiny_stage1, "STAGE2_CHECKPOINT": transformer, "NUM_IMAGES": 8,
      "WORKDIR": str(tmp_path)}, str(tmp_path))
  text = _outputs_text(notebook)
  assert "rFID" in text and "FID (samples)" in text
  assert seconds < 240, f"evaluate.ipynb took {seconds:.0f} s"
