"""The embedded default: ``python -m jobs.demo [--output demo_output] [--verbose]``.

Makes a Parquet dataset of real images with a planted shortcut (shapes on crops of scikit-image's photographs;
one class carries a small mark that alone decides half of its images), trains a small ReLU CNN on it, runs
the job on a local Ray, audits the maps with controls and interventions, and writes the pictures.
"""

from worker.cli import command

if __name__ == "__main__":
    command("demo")
