"""Publishing: the Hub, the model card and its template, licences."""
