# ray job submit --working-dir . -- python ray_jobs/explore.py --model s3://bucket/runs/alip/export --data s3://bucket/world-captioned --out s3://bucket/explore/scores.parquet --actors 4
"""Score a captioned dataset with a trained model's gates (s_tc, s_it, s_ic, W_s, W_t, W_c) for the
service's /explore page.

    python ray_jobs/explore.py --model demo_out/runs/demo-alip/export --data demo_out/world-captioned --out demo_out/explore/scores.parquet

Every ExploreConfig field is a flag (`--help`). Library: alip.explore.
"""
import sys

from alip.explore.job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
