"""What a person looks at: overlays and figures, window / level, reports."""
