`GET /v1/messages/{id}` and `GET /v1/messages` show message status over the HTTP API, and admin tokens hold, release, flush, requeue and delete messages and keep the suppression list over it.
