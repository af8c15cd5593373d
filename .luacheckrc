-- luacheck settings for the Lua library, the example scripts and the Lua tests (`make lint`).
std = "lua54"
max_line_length = false
