"""One router per resource: health, certify, jobs, models, datasets."""
