"""Data: the offline world (real IU X-ray reports, rendered radiographs) and the dataset readers."""
