"""ALIP pretraining on Ray Train (DDP), with checkpoints, fault tolerance and resume.

    ray job submit --working-dir . -- python ray_jobs/pretrain.py --config vit-b-32 --data s3://bucket/captioned
    python ray_jobs/pretrain.py --config tiny --data demo_out/world-captioned      # local Ray, CPU

Every config field is a flag (`--help`). Re-running the same command (same --run-name and
--storage-path) resumes from the latest checkpoint. The library does the work: alip.pretrain.job.
"""
import sys

from alip.pretrain.job import main

if __name__ == "__main__":
    main(sys.argv[1:])
