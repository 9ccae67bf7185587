"""The bridge's decisions about clients: their protocol, who gets which bar, backlogs, and which
clients' feeds are down. Pure: no sockets."""
