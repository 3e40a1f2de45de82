"""The embedded default: ``python -m jobs.demo [--output demo_output]``.

Makes a Parquet dataset of real images (scikit-learn digits), trains the original
question's CNN on it, runs the job on a local Ray and writes image | map overlays.
"""

from worker.cli import command

if __name__ == "__main__":
    command("demo")
