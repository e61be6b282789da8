"""Running oi-ray tasks on a Ray cluster: cluster bring-up, Ray Job submission, job commands."""
