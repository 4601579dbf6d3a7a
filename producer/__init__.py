"""Producer: shards an image list into evaluation tasks and submits them as a chord."""
