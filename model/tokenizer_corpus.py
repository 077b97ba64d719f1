"""The built-in tokenizer training text: about 20 KB of varied English prose (plus a few lines of
code, logs and other European languages) so that byte-level BPE can learn ~4k merges without any
download. Changing one character changes every checkpoint's tokenizer: treat it as frozen data."""

CORPUS = r'''The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog.
Pack my box with five dozen liquor jugs, and then carry it across the old stone bridge before dark.

On a cold morning in early spring, the harbour was quiet. Fishing boats rocked gently against the
wooden pier, their ropes creaking as the tide came in. An old man sat on an upturned crate, mending
a net with slow, patient hands. He had done this every day for forty years, and he said that the sea
had taught him everything worth knowing: that storms pass, that fish return, and that a knot tied in
haste will always come undone when you need it most.

Further up the hill, the baker had already been awake for hours. The smell of fresh bread drifted
through the narrow streets, past shuttered windows and sleeping cats. She shaped each loaf by hand,
scoring the tops with a sharp blade so the crust would open in the heat of the oven. Customers
arrived at seven, some still in their slippers, and by nine o'clock the shelves were nearly empty.

Computers were once the size of rooms. Early machines used vacuum tubes that glowed and failed often,
and engineers walked the aisles with baskets of spare parts. The invention of the transistor changed
everything: smaller, cheaper and far more reliable, it made possible the integrated circuit, and then
the microprocessor. Today a phone in your pocket holds more computing power than every machine that
existed in 1960 combined. Programs that once took a week to run now finish before you can blink.

A language model predicts the next word from the words that came before it. It reads text as a
sequence of tokens, small pieces of words, and learns which tokens tend to follow which. Given the
prompt "Once upon a time", it might continue with "there lived a king who had three daughters".
The model does not understand stories the way people do, but it has seen so many of them that its
guesses are often surprisingly good. Serving such a model quickly means keeping the hardware busy:
batching many requests together, caching what has already been computed, and streaming each new
token to the user as soon as it is ready.

Mixture-of-experts models split their feed-forward layers into many small experts. For each token a
router chooses a handful of experts, so only a fraction of the weights are used at every step. This
makes a very large model cheap to run per token, but it also means the experts must be placed
carefully across machines, because every token may need to travel to a different device and back.

In the garden, the tomatoes were finally ripening. Rows of beans climbed their wooden poles, and the
lettuce had bolted in the heat of July. Bees moved from flower to flower among the lavender and the
thyme. A blackbird watched from the fence, waiting for the gardener to turn over a fresh patch of
soil full of worms. Every evening the watering can made its rounds, and every morning there was
something new: a squash the size of a football, a strawberry half eaten by a slug, a sunflower
taller than the shed.

Mathematics begins with counting: one, two, three, four, five, six, seven, eight, nine, ten. Then
come addition and subtraction, multiplication and division, fractions and decimals. The number pi
is about 3.14159, and the square root of two is about 1.41421. A prime number has exactly two
divisors; the first few primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Euclid proved more than
two thousand years ago that there are infinitely many of them. Matrices multiply rows by columns,
and a vector of length n can be rotated, scaled, projected and normalised. The exponential function
grows faster than any polynomial, while the logarithm grows slower than any power.

The train left the station at 08:45 and followed the river north through wide green valleys. Cows
grazed beside the track, and small villages appeared and vanished among the trees. Passengers read
newspapers, typed on laptops, or simply watched the landscape change from farmland to forest to
mountain. At the border the conductor checked tickets and passports, then wished everyone a pleasant
journey. By the afternoon snow lay on the peaks, and the air through the open window smelled of pine.

Music is organised sound. A melody is a sequence of notes in time; harmony is what happens when
several notes sound together; rhythm is the pattern of long and short durations that makes us want
to dance. An orchestra has strings, woodwinds, brass and percussion. The violin sings, the cello
speaks in a deeper voice, the trumpet calls, and the timpani roll like distant thunder. A good
conductor listens more than she waves her arms.

Weather forecasts are built from measurements of temperature, pressure, humidity and wind taken all
over the world. Supercomputers solve equations of fluid motion on a grid that covers the planet, and
step the atmosphere forward in time, minute by minute, hour by hour. Small errors grow, which is why a
forecast for tomorrow is usually right and a forecast for next month is little better than a guess.
Still, people check the weather every day: should I take an umbrella, a coat, a pair of sunglasses?

The library closed at six, but the reading room stayed open late during examinations. Students sat
under green lamps with stacks of books and cups of cold coffee, writing essays on history, chemistry,
philosophy and law. Someone always fell asleep with their head on an open dictionary. The librarian,
who had seen a thousand such nights, walked quietly between the tables and switched off the lights
only when the last reader had gone home.

Cooking rice is simple once you learn it. Rinse the grains until the water runs clear, add one and a
half cups of water for every cup of rice, bring it to a boil, cover, and turn the heat down low. Wait
fifteen minutes, then let it rest for five more without lifting the lid. For soup, chop an onion, two
carrots and a stick of celery, soften them in butter, add stock, lentils and a bay leaf, and simmer
until everything is tender. Season with salt, pepper and a squeeze of lemon juice.

Questions to ask before deploying a service: How many requests per second must it handle? What is
the acceptable latency at the 99th percentile? What happens when a node fails, a disk fills up or
the network drops packets? Where do the logs go, who gets paged at three in the morning, and how do
we roll back a bad release? Good systems are boring: they start quickly, fail loudly, recover by
themselves, and tell you clearly what went wrong.

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(i, fibonacci(i))

{"name": "example", "version": "1.0.0", "enabled": true, "count": 42, "tags": ["alpha", "beta"]}
SELECT id, name, created_at FROM users WHERE active = 1 ORDER BY created_at DESC LIMIT 100;
https://example.com/docs/getting-started?lang=en#install  user@example.org  +1 (555) 010-9999

The mountain path climbed steeply through the forest, crossing streams on stepping stones and fallen
logs. Halfway up there was a small hut where walkers could rest, drink water from a spring and write
their names in a battered visitors' book. Some entries were decades old: "Reached the top in fog,
saw nothing, happy anyway." "Our daughter's first summit, aged seven." "Forgot the sandwiches again."
From the ridge you could see three lakes, a chain of distant peaks and, on clear days, the sea.

Birds migrate thousands of kilometres each year, guided by the sun, the stars and the magnetic field
of the earth. Swallows leave northern Europe in autumn and spend the winter in southern Africa, then
return in spring to the very same barns where they were born. Geese fly in a V so that each bird
saves energy in the wake of the one ahead, taking turns at the front. Arctic terns see two summers
every year, travelling from pole to pole and back again.

A good story needs a character who wants something, an obstacle in the way, and a change by the end.
The detective wants the truth, the explorer wants the unknown river, the child wants the lost dog to
come home. Readers keep turning pages because they want to know what happens next, and they remember
the ending because it surprised them and yet felt inevitable. Writers revise endlessly: they cut
whole chapters, rename characters, move scenes around and read every sentence aloud.

Electricity flows when charges move through a conductor. Voltage pushes, resistance opposes, and the
current is their ratio, as Ohm's law says. Power is voltage times current, measured in watts. A
battery stores chemical energy and releases it slowly; a capacitor stores charge and releases it all
at once; an inductor resists changes in current. Together with transistors these parts make radios,
computers, pacemakers and electric cars.

Kindness costs little and returns much. Hold the door, learn the names of the people you work with,
say thank you and mean it. When a colleague makes a mistake, fix the problem first and talk about
blame never. Ask questions when you do not understand, and answer them patiently when others ask you.
Most work is done by teams, and teams are built on trust earned one small promise at a time.

Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April,
May, June, July, August, September, October, November, December. North, south, east and west.
Red, orange, yellow, green, blue, indigo and violet. Zero, hundred, thousand, million, billion.

Astronomers measure distances in light-years, the distance light travels in one year: nearly ten
trillion kilometres. The nearest star beyond the sun, Proxima Centauri, is a little over four
light-years away. Galaxies gather in clusters, clusters in superclusters, and between them stretch
enormous voids. Telescopes on mountaintops and in orbit collect faint photons that left their sources
billions of years ago, so looking far away is also looking back in time. Comets swing past with
glowing tails; meteors streak across August skies; Jupiter's moons wheel around their giant planet
exactly as Galileo sketched them in his notebook.

The hospital never sleeps. Nurses hand over their patients at shift change, describing medications,
allergies, blood pressure and temperature. Surgeons scrub before operations, anaesthetists monitor
breathing and heartbeat, and pharmacists double-check every prescription. Vaccines have prevented
smallpox, polio and measles from killing millions; antibiotics turned once-deadly infections into
minor inconveniences. Still, doctors warn that bacteria evolve resistance when antibiotics are
overused, and that washing hands remains one of the most effective treatments ever discovered.

Economists study how people, firms and governments make choices under scarcity. Prices rise when
demand exceeds supply and fall when warehouses overflow. Inflation erodes savings; unemployment wastes
talent; interest rates set by central banks ripple through mortgages, loans and investments.
Markets are efficient at some things and hopeless at others, which is why societies build roads,
schools and courts collectively. Every budget is a list of priorities disguised as arithmetic.

The football match was tied at half-time. Supporters sang, waved scarves and argued with the referee
from two hundred metres away. In the seventy-third minute a defender slipped, the striker sprinted
clear, and the goalkeeper dived the wrong way. The stadium erupted. Afterwards the coach praised her
squad's discipline, the captain thanked the fans, and journalists hurried to file their reports
before midnight. Elsewhere, cyclists climbed alpine passes, swimmers chased records, tennis players
served aces, and marathon runners crossed finish lines with trembling legs and enormous grins.

Judges interpret laws written by legislatures and apply them to particular disputes. A contract
requires offer, acceptance and consideration; negligence requires duty, breach, causation and harm.
Appeals courts review whether procedures were fair and whether the law was correctly understood.
Constitutions protect freedoms of speech, religion and assembly, and they divide power among
executive, legislative and judicial branches so that no single authority becomes tyrannical.

Volcanoes form where tectonic plates collide or separate, or above plumes of unusually hot mantle.
Lava flows downhill glowing orange, cooling into black basalt; ash clouds ground aeroplanes and fertilise
distant fields. Earthquakes release strain accumulated along faults over centuries. Glaciers carve
valleys, rivers deposit deltas, deserts shift their dunes, and coral reefs grow a few millimetres
each year, building islands from the skeletons of countless tiny animals.

Painters mix pigments ground from minerals, plants and insects. Renaissance artists discovered linear
perspective, making flat walls seem to open onto distant landscapes. Impressionists carried easels
outdoors to capture flickering sunlight on water, haystacks and cathedrals. Sculptors chisel marble,
cast bronze, weld steel and mould clay. Photographers wait patiently for the right light; architects
balance beauty, budget and gravity; potters centre wet clay on spinning wheels.

Chemistry explains why iron rusts, why bread rises and why fireworks sparkle in different colours.
Atoms bond by sharing or transferring electrons; molecules react when collisions are energetic enough;
catalysts lower the barrier without being consumed. Water boils at one hundred degrees Celsius at sea
level, but at lower temperatures on high mountains. Salt dissolves, oil floats, vinegar fizzes with
baking soda, and enzymes in our bodies accelerate thousands of reactions every second.

Software engineers write code, review each other's changes, and argue cheerfully about naming.
Version control records every modification; continuous integration compiles and tests each commit;
containers package applications with their dependencies; orchestrators schedule workloads across
clusters and restart crashed processes automatically. Latency, throughput, memory bandwidth,
scheduling fairness, graceful degradation, observability and reproducibility are words heard daily.
Debugging is detective work: reproduce the failure, shrink the input, form a hypothesis, test it.

Historians read letters, diaries, tax records, ship manifests and newspapers to reconstruct the past.
Empires rose and crumbled; merchants carried silk, spices, porcelain and ideas along caravan routes
and sea lanes; plagues, famines and revolutions reshaped entire continents. The printing press spread
literacy, the steam engine powered factories, the telegraph shrank oceans, and vaccination doubled
life expectancy. Every generation rewrites history because it asks new questions of old evidence.

Farmers rotate crops to keep soil healthy: wheat one year, clover the next, then barley or potatoes.
Orchards bloom pink and white in April; vineyards ripen in September; pumpkins swell through October.
Shepherds move flocks to upland pastures in summer and bring them down before the snow. Tractors,
combine harvesters, irrigation channels, greenhouses and seed banks feed billions of people, while
careful beekeepers tend the hives whose pollinators make so many harvests possible.

Quelques phrases en français : le chat dort sur le canapé, la pluie tombe doucement, et nous buvons
un café au lait. Ein paar Sätze auf Deutsch: Der Zug kommt pünktlich, die Kinder spielen im Garten,
und morgen wird es schön. Algunas frases en español: la biblioteca abre temprano, el mercado está
lleno de frutas y verduras, y mañana iremos a la playa. Alcune frasi in italiano: la pasta è pronta,
il sole splende e gli amici arrivano stasera. Um pouco de português: obrigado, bom dia, até logo.

Oceans cover most of our planet yet remain largely unexplored. Whales sing across vast distances;
octopuses solve puzzles and change colour in an instant; anglerfish dangle luminous lures in the
permanent darkness of the abyss. Currents carry warmth from the tropics toward the poles, shaping
climates on every continent. Plankton, invisible individually, produce much of the oxygen we breathe.
Sailors navigated by sextant, chronometer and chart long before satellites offered positioning.

Philosophers ask what we can know, how we should live and what makes an argument valid. Socrates
questioned everyone in the marketplace; Aristotle catalogued animals, plays and syllogisms; Descartes
doubted everything except his own thinking; Hume wondered why we expect the future to resemble the
past. Ethics weighs consequences, duties, virtues and rights, and rarely produces unanimous answers.

Typical error messages: file not found; permission denied; connection refused; timeout exceeded;
out of memory; invalid argument; unexpected end of input; checksum mismatch; disk quota exceeded.
Typical log line: 2025-03-14T09:26:53Z INFO worker-3 loaded 48 layers in 12.7s (shard 2/8, 19.4 GiB).
Typical shell: ls -la /var/log && grep -i error app.log | tail -n 20 > /tmp/errors.txt; echo $?
Keyboard symbols: ~ ` ! @ # $ % ^ & * ( ) - _ = + [ ] { } \ | ; : ' " , . < > / ? and tabs	too.

Children learn by playing. Building blocks teach balance, puzzles teach patience, and make-believe
teaches empathy. Toddlers repeat new words endlessly, delighted by the sounds; older children invent
elaborate rules for games in the playground and then argue about them with great seriousness.
Teachers notice when a shy pupil finally raises a hand, and they remember it for years.

Carpenters measure twice and cut once. They plane rough boards smooth, join them with dovetails,
mortises and tenons, glue and clamp them overnight, then sand, stain and varnish the finished
cabinet. Blacksmiths heat iron until it glows, hammer it on the anvil, quench it hissing in water.
Tailors chalk patterns onto woollen cloth, stitch seams, press lapels and sew buttonholes by hand.
Plumbers solder copper pipes; electricians thread cables through conduits; bricklayers spread mortar
with quick flicks of the trowel; roofers nail slates in overlapping rows against wind and weather.

Insects outnumber every other animal. Ants farm fungus and herd aphids; termites build ventilated
mounds; dragonflies hunt mosquitoes above ponds; butterflies emerge from chrysalises with crumpled
wings that unfold and dry in the sunshine. Beetles alone include hundreds of thousands of species,
armoured in iridescent green, bronze and crimson. Fireflies flash coded signals on humid evenings,
crickets chirp faster as temperatures rise, and spiders weave webs of astonishing geometric precision.

Airports choreograph thousands of movements daily. Controllers sequence arrivals and departures,
baggage conveyors sort suitcases by barcode, refuelling trucks circle parked jets, and de-icing
crews spray wings with warm glycol during winter storms. Pilots run checklists, calculate takeoff
speeds, brief cabin crew and greet passengers who are already thinking about their connections,
luggage allowances, lounges, delayed departures, overbooked flights and customs declarations.

Knitting turns a single strand of yarn into fabric through loops pulled through loops. Cables,
ribbing, lace and fair-isle colourwork emerge from patterns written in abbreviations: knit two,
purl two, slip one, yarn over, decrease. Quilters piece scraps into geometric blankets; embroiderers
outline flowers in satin stitch; weavers throw shuttles between warp threads on wooden looms.

Mushrooms fruit after autumn rain: chanterelles, porcini, puffballs, oyster mushrooms and the deadly
pale death cap, which foragers learn to recognise before anything else. Beneath the forest floor,
fungal threads connect the roots of neighbouring trees, exchanging sugars, water and chemical
warnings. Lichens colonise bare rock; mosses cushion damp stones; ferns unroll their fronds in shade.
'''
