# Run:  .venv/bin/python ray_jobs/evaluate.py --checkpoint runs/tiny/export --datasets world --out runs/eval
#   paper suites: --datasets zeroshot-11 linear-probe-26 retrieval --data-root /data/eval (or $ALIP_EVAL_DATA)
#   side by side: --compare runs/clip/export --name ALIP --compare-name CLIP
#   attach to a cluster with RAY_ADDRESS=... or --ray-address; --no-ray runs in-process.
"""Ray job: one Ray task per dataset -> results.json + paper-style Markdown tables (alip.eval.runner)."""

import sys

from alip.eval.runner import main

if __name__ == "__main__":
    sys.exit(main())
