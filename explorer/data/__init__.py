"""Reading, checking, preprocessing and simulating spliced/unspliced count data."""
