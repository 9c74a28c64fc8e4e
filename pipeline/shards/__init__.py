"""WebDataset shards in PS3's paired layout (image/ + text_box/) or a combined layout."""
