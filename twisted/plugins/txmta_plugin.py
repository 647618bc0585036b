from twisted.application.service import ServiceMaker

txmta = ServiceMaker("txmta", "txmta.tap", "txmta mail transfer agent", "txmta")
