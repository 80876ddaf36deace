"""The console's stylesheet, served by the console itself (``/static/console.css``): nothing comes from outside."""

CSS = """
:root { --ink: #1d2433; --mute: #5b6578; --line: #d8dde6; --ok: #17795e; --bad: #b42318; --warn: #9a6700;
        --accent: #2f5fb3; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       background: var(--bg); }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 2px 0 6px; color: var(--mute); }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 24px 32px; max-width: 1200px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin: 14px 0; padding: 10px 16px; }
h2 { font-size: 16px; margin: 4px 0 10px; }
h3 { font-size: 14px; margin: 10px 0 6px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--mute); font-weight: 600; }
table.facts td:first-child { width: 160px; }
table.facts thead { display: none; }
table.counts td, table.verdict td { font-variant-numeric: tabular-nums; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.pill { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; background: #e8ebf0; }
.pill.ok, .pill.accepted, .pill.approved { background: #dcf3ea; color: var(--ok); }
.pill.bad, .pill.refused { background: #fde8e6; color: var(--bad); }
.pill.pending { background: #fff3d1; color: var(--warn); }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.card.pending { border-color: #e9c46a; background: #fffbf0; }
form.inline { display: inline-block; margin: 6px 12px 4px 0; }
button { font: inherit; padding: 5px 14px; border-radius: 4px; border: 1px solid var(--line); cursor: pointer; }
button.approve { background: var(--ok); color: #fff; border-color: var(--ok); }
button.refuse { background: #fff; color: var(--bad); border-color: var(--bad); }
input[type=text] { font: inherit; padding: 4px 8px; width: 280px; border: 1px solid var(--line); border-radius: 4px; }
.warn { color: var(--warn); }
.flash { background: #dcf3ea; color: var(--ok); padding: 8px 12px; border-radius: 6px; margin: 12px 24px 0; }
svg.ledger { max-width: 100%; height: auto; }
svg .axis { stroke: var(--mute); stroke-width: 1; }
svg .bar { fill: var(--accent); }
svg .bar.over { fill: var(--bad); }
svg .ceiling { stroke: var(--bad); stroke-width: 1.5; stroke-dasharray: 6 4; }
svg .ceiling-label { fill: var(--bad); font-size: 12px; }
svg .tick, svg .value { fill: var(--mute); font-size: 11px; }
details summary { cursor: pointer; color: var(--accent); }
"""
