"""deeplab export: masks to PNG files or COCO, beside the job."""
