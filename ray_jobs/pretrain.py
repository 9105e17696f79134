"""ALIP pretraining on Ray Train (DDP): elastic workers, preemption-aware checkpoints, resume.

    ray job submit --working-dir . -- python ray_jobs/pretrain.py --config vit-b-32 \
        --data s3://bucket/captioned --storage-path s3://bucket/runs --num-workers 2-8
    python ray_jobs/pretrain.py --config tiny --data demo_out/world-captioned      # local Ray, CPU

`--config` is required; every config field is a flag (`--help`). `--num-workers 2-8` is elastic
(shrinks on node loss, grows back, same global batch); a spot notice (node drained with reason
PREEMPTION) triggers a just-in-time checkpoint. Re-running the same command (same --run-name and
--storage-path) resumes from the latest checkpoint. The library does the work: alip.pretrain.job.
"""
import sys

from alip.pretrain.job import main

if __name__ == "__main__":
    main(sys.argv[1:])
