"""Images in: dataset readers, the one decoder, streamed ImageFolder trees, graded distribution shifts."""
