txmta signs accepted mail and its own DSNs with DKIM (RSA-SHA256 and Ed25519-SHA256, `[[dkim]]`, `[signing] default_domain`), and `txmta dkim keygen` makes a key and prints its DNS TXT record.
SIGHUP reloads the DKIM keys and the outbound `[[tls.policy]]` tables along with the inbound certificate.
