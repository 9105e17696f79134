# ray job submit --working-dir . -- python ray_jobs/caption.py --input s3://bucket/world --output s3://bucket/world-captioned --captioner builtin --max-actors 4 --gpus-per-actor 1
"""Caption a dataset with Ray decode tasks and a caption actor pool (elastic, resumable, exactly once).

    python ray_jobs/caption.py --input demo_out/world --output demo_out/world-captioned --captioner builtin

Every CaptionJobConfig field is a flag (`--help`). Re-running the same command after a crash
resumes: finished units are skipped, unfinished ones are redone whole. Library: alip.captioning.
"""
import sys

from alip.captioning import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
