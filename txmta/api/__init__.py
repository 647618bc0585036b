"""HTTP submission: the pure parts (submission values, the Postmark-compatible and native JSON
mappings, MIME building) that the HTTP server uses."""
