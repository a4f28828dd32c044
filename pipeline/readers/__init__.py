"""What reads a finished output, with no cluster: text search over the frames table and its
approximate index, the HTML report, benchmark question files (multiple choice) and scoring.
May import the base, store/ and stages/ (CLIP encoding, decoding for thumbnails); never run/."""
